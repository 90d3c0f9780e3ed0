"""Evaluation: bundled lm-eval tasks scored through lm-eval's real pipeline, HumanEval execution, quick eval, CLI.

Scoring is checked with scripted models whose answers are known: an oracle that puts its probability on the
right continuation must score 100%, one with flat logits exactly the share of items whose gold is choice 0
(ties go to the first choice), a random tiny transformer near chance.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sparsecraft import cli
from sparsecraft.cli import eval as eval_cmd
from sparsecraft.errors import ConfigError
from sparsecraft.evaluate import humaneval
from sparsecraft.evaluate.results import summarize_lm_eval
from sparsecraft.evaluate.suites import SUITES, TaskRequest, parse_tasks
from sparsecraft.evaluate.tasks import LOCAL_TASKS, TASKS_DIR, build_local

REPO = Path(__file__).resolve().parents[1]
# lm-eval is a dev dependency, but a checkout without the [eval] extra still runs every test that does not need it
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason='lm-eval is not installed: pip install -e ".[eval]"')


def run_lm_eval(*args, **kwargs):
    from sparsecraft.evaluate.lm_eval_bridge import run_lm_eval as run

    return run(*args, **kwargs)


def prepare_tasks(*args, **kwargs):
    from sparsecraft.evaluate.lm_eval_bridge import prepare_tasks as prepare

    return prepare(*args, **kwargs)
TASK_DATA = TASKS_DIR / "data"
MC_TASKS = {"sc_math_mc": " ", "sc_general_mc": " ", "sc_code_mc": "\n"}  # task -> target delimiter


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def char_tokenizer():
    """Character-level fast tokenizer (128 ids) that keeps newlines and tabs, so code round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = ["\n", "\t"] + [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    vocab.update({f"<extra_{i}>": i for i in range(len(vocab), 128)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def tiny_config(max_positions: int = 4096):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_llama(seed: int = 0, init_std: float = 0.02):
    from transformers import AutoModelForCausalLM

    config = tiny_config()
    config.initializer_range = init_std
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


class ScriptedLM(torch.nn.Module):
    """A model object lm-eval's HFLM accepts, whose outputs come from a script.

    Log-likelihood: while a row follows one of `right` token sequences from its start, the next token of that
    sequence gets logit +20 and all others 0; off every such path the logits are flat. Generation: the
    completion `answers[prompt ids]`, or nothing.
    """

    def __init__(self, tokenizer, right: list[str] = (), answers: dict[str, str] | None = None):
        super().__init__()
        self.config = tiny_config()
        self.tokenizer = tokenizer
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the object a device and a dtype
        self.trie: dict = {}
        for text in right:
            node = self.trie
            for token in self._ids(text):
                node = node.setdefault(token, {})
        self.answers = {tuple(self._ids(p)): self._ids(a) for p, a in (answers or {}).items()}

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def tie_weights(self) -> None:
        pass

    def forward(self, input_ids: torch.Tensor, **_) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)
        for b, row in enumerate(input_ids.tolist()):
            node = self.trie
            for t, token in enumerate(row):
                node = node.get(token) if node is not None else None
                if not node:
                    break
                for nxt in node:
                    logits[b, t, nxt] = 20.0
        return SimpleNamespace(logits=logits)

    def generate(self, input_ids: torch.Tensor, max_length: int | None = None, pad_token_id: int = 0, **_):
        pad = self.tokenizer.pad_token_id
        rows = []
        for row in input_ids.tolist():
            prompt = tuple(t for t in row if t != pad)  # lm-eval pads prompts on the left
            rows.append(row + self.answers.get(prompt, []))
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def mc_prompt(task: str, doc: dict) -> str:
    if task == "sc_math_mc":
        return f"Question: {doc['question']}\nAnswer:"
    if task == "sc_general_mc":
        return doc["context"]
    return f"Problem: {doc['problem']}\nSolution:"


def mc_docs(task: str) -> list[dict]:
    return read_jsonl(TASK_DATA / f"{task.removeprefix('sc_')}_test.jsonl")


def oracle_sequences(tasks) -> list[str]:
    return [mc_prompt(t, d) + MC_TASKS[t] + d["choices"][d["gold"]] for t in tasks for d in mc_docs(t)]


def evaluate(model, tasks: str, **kwargs) -> dict:
    kwargs.setdefault("tokenizer", char_tokenizer())
    raw, prepared = run_lm_eval(model, tasks, batch_size=8, **kwargs)
    return summarize_lm_eval(raw, prepared.names)["tasks"]


# ------------------------------------------------------------------------------------------ local task data


def test_bundled_task_data_is_rebuilt_byte_for_byte(tmp_path):
    written = build_local.build(REPO / "data" / "quickstart", tmp_path)
    committed = sorted(p.name for p in TASK_DATA.glob("*.jsonl"))
    assert sorted(p.name for p in written) == committed
    for path in written:
        assert path.read_bytes() == (TASK_DATA / path.name).read_bytes(), path.name


def test_multiple_choice_data_is_well_formed():
    for task in MC_TASKS:
        docs = mc_docs(task)
        golds = [d["gold"] for d in docs]
        assert max(golds.count(k) for k in range(4)) - min(golds.count(k) for k in range(4)) <= 1  # balanced
        for doc in docs:
            choices = doc["choices"]
            assert len(choices) == 4 and len(set(choices)) == 4
            right = choices[doc["gold"]]
            assert not any(c != right and (c.startswith(right) or right.startswith(c)) for c in choices)
    heldout = read_jsonl(REPO / "data" / "quickstart" / "heldout" / "math.jsonl")
    for doc, record in zip(mc_docs("sc_math_mc"), heldout):
        assert record["response"].rstrip().endswith(f"The answer is: {doc['choices'][doc['gold']]}")


# ------------------------------------------------------------------------------------ multiple-choice scoring


def _first_argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


@needs_lm_eval
def test_oracle_scores_100_percent_and_flat_model_scores_as_computed_by_hand():
    tok = char_tokenizer()
    names = ",".join(MC_TASKS)
    right = evaluate(ScriptedLM(tok, right=oracle_sequences(MC_TASKS)), names, tokenizer=tok)
    for task in MC_TASKS:
        assert right[task]["acc"] == 1.0 and right[task]["acc_norm"] == 1.0, task
    # flat logits: every token costs log(128), so acc picks the choice with the fewest tokens and acc_norm
    # (log-likelihood per character of the choice) the one with the most; ties go to the first choice
    flat = evaluate(ScriptedLM(tok), names, tokenizer=tok)
    for task, delimiter in MC_TASKS.items():
        hits = hits_norm = 0
        for doc in mc_docs(task):
            n = [len(tok(delimiter + c, add_special_tokens=False)["input_ids"]) for c in doc["choices"]]
            hits += _first_argmax([-k for k in n]) == doc["gold"]
            hits_norm += _first_argmax([-k / len(c) for k, c in zip(n, doc["choices"])]) == doc["gold"]
        assert flat[task]["acc"] == pytest.approx(hits / len(mc_docs(task))), task
        assert flat[task]["acc_norm"] == pytest.approx(hits_norm / len(mc_docs(task))), task


@needs_lm_eval
def test_random_transformer_scores_near_chance():
    # large random weights, so its preferences are its own rather than the flat model's length bias
    scores = evaluate(tiny_llama(seed=0, init_std=1.0), ",".join(MC_TASKS))
    total = sum(len(mc_docs(t)) for t in MC_TASKS)
    for metric in ("acc", "acc_norm"):
        acc = sum(scores[t][metric] * len(mc_docs(t)) for t in MC_TASKS) / total
        assert 0.1 <= acc <= 0.45, (metric, acc)  # chance is 0.25 over 67 items (1 sd = 0.053)


@needs_lm_eval
def test_limit_and_fewshot_reach_lm_eval():
    tok = char_tokenizer()
    raw, prepared = run_lm_eval(ScriptedLM(tok), "sc_math_mc:3,sc_code_mc", tokenizer=tok, limit=5,
                                num_fewshot=2, batch_size=4)
    summary = summarize_lm_eval(raw, prepared.names)
    assert summary["samples"] == {"sc_math_mc": 5, "sc_code_mc": 5}
    assert summary["num_fewshot"] == {"sc_math_mc": 3, "sc_code_mc": 2}  # name:N wins over --num-fewshot


@needs_lm_eval
def test_crafted_model_scores_like_its_dense_base_through_lm_eval():
    """A freshly crafted model computes what the dense one does (W_up = 0): lm-eval must see the same
    log-likelihoods, which also shows the bridge runs crafted models (router, recorder, aux outputs)."""
    import sparsecraft

    dense, tok = tiny_llama(seed=4, init_std=0.5), char_tokenizer()
    crafted = sparsecraft.craft(tiny_llama(seed=4, init_std=0.5), num_experts=4, top_k=2, adapter_dim=8).eval()
    assert sparsecraft.is_crafted(crafted)
    lls = []
    for model in (dense, crafted):
        raw, _ = run_lm_eval(model, "sc_math_mc", tokenizer=tok, limit=4, batch_size=4, log_samples=True)
        lls.append([ll for sample in raw["samples"]["sc_math_mc"] for (ll, _), in sample["resps"]])
    assert len(lls[0]) == 16
    assert lls[0] == pytest.approx(lls[1], abs=1e-4)
    assert len({round(x, 3) for x in lls[0]}) > 4  # real, varied scores, not a constant


@needs_lm_eval
def test_registered_model_type_loads_a_path(tmp_path):
    """lm-eval's own entry point with `model="sparsecraft"` and a path loads through sparsecraft.load."""
    import lm_eval

    from sparsecraft.evaluate.lm_eval_bridge import MODEL_TYPE, task_manager
    from sparsecraft.evaluate.tasks import task_config

    tiny_llama(seed=5).save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    raw = lm_eval.simple_evaluate(model=MODEL_TYPE, model_args={"pretrained": str(tmp_path / "m")},
                                  tasks=[task_config("sc_code_mc")], task_manager=task_manager(False), limit=2)
    assert raw["results"]["sc_code_mc"]["acc,none"] in (0.0, 0.5, 1.0)
    assert raw["config"]["model_path"] == str(tmp_path / "m")


# ------------------------------------------------------------------------------------ generation exact match


def _math_answers(make) -> dict[str, str]:
    docs = read_jsonl(TASK_DATA / "math_gen_test.jsonl")
    return {f"Question: {d['question']}\nAnswer:": make(d) for d in docs}


@pytest.mark.parametrize("make, strict, flexible", [
    (lambda d: " " + d["solution"] + "\n\nQuestion: what next?", 1.0, 1.0),  # stops at the blank line
    (lambda d: f" So it is {d['answer']}.\nThe answer is: {float(d['answer']) + 1:g}", 0.0, 0.0),
    (lambda d: f" The total comes to {d['answer']}.", 0.0, 1.0),  # right number, not in the strict format
])
@needs_lm_eval
def test_generation_exact_match_with_scripted_generator(make, strict, flexible):
    tok = char_tokenizer()
    scores = evaluate(ScriptedLM(tok, answers=_math_answers(make)), "sc_math_gen", tokenizer=tok, limit=8)
    assert scores["sc_math_gen"]["exact_match/strict-match"] == strict
    assert scores["sc_math_gen"]["exact_match/flexible-extract"] == flexible


@needs_lm_eval
def test_chat_template_prompts_reach_the_model():
    tok = char_tokenizer()

    def chat(prompt: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)

    plain = _math_answers(lambda d: " " + d["solution"])
    model = ScriptedLM(tok, answers={chat(p): a for p, a in plain.items()})  # answers only chat prompts
    for use_chat, expected in ((False, 0.0), (True, 1.0)):
        scores = evaluate(model, "sc_math_gen", tokenizer=tok, limit=3, apply_chat_template=use_chat)
        assert scores["sc_math_gen"]["exact_match/strict-match"] == expected


# ------------------------------------------------------------------------------------------------- HumanEval


@needs_lm_eval
def test_humaneval_refuses_without_permission():
    problem = humaneval.load_problems()[0]
    with humaneval.allow_code_execution(False):
        with pytest.raises(humaneval.CodeExecutionRefused, match="--allow-code-execution"):
            humaneval.check_completion(problem, problem["canonical_solution"])
        with pytest.raises(humaneval.CodeExecutionRefused):
            humaneval.process_results(problem, [problem["canonical_solution"]])
    with pytest.raises(ConfigError, match="--allow-code-execution"):
        prepare_tasks([TaskRequest("sc_humaneval")], allow_code_execution=False)


def test_humaneval_runs_completions_in_a_subprocess(tmp_path):
    problems = humaneval.load_problems()
    assert len(problems) == 164
    problem = problems[0]
    marker = tmp_path / "ran"
    with humaneval.allow_code_execution():
        assert humaneval.check_completion(problem, problem["canonical_solution"]).passed
        wrong = humaneval.check_completion(problem, "    return False\n")
        assert not wrong.passed and "AssertionError" in wrong.output
        # the program runs in another process: its os.getpid() differs and its side effects are real
        probe = f"    open({str(marker)!r}, 'w').write(str(__import__('os').getpid()))\n    return True\n"
        humaneval.check_completion(problem, probe)
        assert marker.read_text() != str(os.getpid())
        slow = humaneval.check_completion(problem, "    while True:\n        pass\n", timeout=1.0)
        assert slow.status == "timed out" and not slow.passed


@needs_lm_eval
def test_humaneval_task_through_lm_eval():
    tok = char_tokenizer()
    problems = humaneval.load_problems()[:3]
    right = ScriptedLM(tok, answers={p["prompt"]: p["canonical_solution"] for p in problems})
    wrong = ScriptedLM(tok, answers={p["prompt"]: "    return None\n" for p in problems})
    assert evaluate(right, "sc_humaneval", tokenizer=tok, limit=3,
                    allow_code_execution=True)["sc_humaneval"]["pass@1"] == 1.0
    assert evaluate(wrong, "sc_humaneval", tokenizer=tok, limit=3,
                    allow_code_execution=True)["sc_humaneval"]["pass@1"] == 0.0
    assert not humaneval.code_execution_allowed()  # the permission ends with the run


def test_sampled_humaneval_scores_pass_at_k_by_the_unbiased_estimator():
    problem = humaneval.load_problems()[0]
    right, wrong = problem["canonical_solution"], "    return None\n"
    with humaneval.allow_code_execution():
        got = humaneval.process_sampled_results(problem, [[right] * 3 + [wrong] * 7])
    # n=10, c=3: pass@1 = c/n, pass@5 = 1 - C(7,5)/C(10,5), pass@10 = 1 (some sample passed)
    assert got == pytest.approx({"pass@1": 0.3, "pass@5": 1 - 21 / 252, "pass@10": 1.0})
    with humaneval.allow_code_execution(False), pytest.raises(humaneval.CodeExecutionRefused):
        humaneval.process_sampled_results(problem, [[right]])


@needs_lm_eval
def test_sampled_humaneval_task_through_lm_eval():
    """lm-eval draws 10 completions per problem (repeats) and hands all of them to the scorer."""
    tok = char_tokenizer()
    problems = humaneval.load_problems()[:2]
    right = ScriptedLM(tok, answers={p["prompt"]: p["canonical_solution"] for p in problems})
    scores = evaluate(right, "sc_humaneval_sampled", tokenizer=tok, limit=2,
                      allow_code_execution=True)["sc_humaneval_sampled"]
    assert {k: v for k, v in scores.items() if "stderr" not in k} == {
        "pass@1/sampled": 1.0, "pass@5/sampled": 1.0, "pass@10/sampled": 1.0}


@needs_lm_eval
def test_chat_humaneval_task_scores_fenced_whole_function_answers():
    """A chat answer (prose around a fenced whole function) passes `sc_humaneval_chat`, where the plain task's
    stop sequences would cut it."""
    tok = char_tokenizer()
    problems = humaneval.load_problems()[:2]
    fenced = {p["prompt"]: f"Sure:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone." for p in problems}
    scores = evaluate(ScriptedLM(tok, answers=fenced), "sc_humaneval_chat", tokenizer=tok, limit=2,
                      allow_code_execution=True)["sc_humaneval_chat"]
    assert scores["pass@1"] == 1.0
    assert evaluate(ScriptedLM(tok, answers=fenced), "sc_humaneval", tokenizer=tok, limit=2,
                    allow_code_execution=True)["sc_humaneval"]["pass@1"] == 0.0


def test_chat_sampled_humaneval_takes_the_code_out_of_every_sampled_answer():
    problem = humaneval.load_problems()[0]
    fenced = f"Here it is:\n```python\n{problem['prompt']}{problem['canonical_solution']}```\nIt works."
    plain, wrong = problem["canonical_solution"], "```python\ndef nothing():\n    return None\n```"
    with humaneval.allow_code_execution():
        got = humaneval.process_sampled_any_completion(problem, [[fenced, plain] + [wrong] * 8])
    assert got == pytest.approx({"pass@1": 0.2, "pass@5": 1 - 56 / 252, "pass@10": 1.0})  # n=10, c=2


@needs_lm_eval
def test_chat_sampled_humaneval_task_through_lm_eval():
    tok = char_tokenizer()
    problems = humaneval.load_problems()[:2]
    fenced = {p["prompt"]: f"Sure:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone." for p in problems}
    scores = evaluate(ScriptedLM(tok, answers=fenced), "sc_humaneval_chat_sampled", tokenizer=tok, limit=2,
                      allow_code_execution=True)["sc_humaneval_chat_sampled"]
    assert {k: v for k, v in scores.items() if "stderr" not in k} == {
        "pass@1/sampled": 1.0, "pass@5/sampled": 1.0, "pass@10/sampled": 1.0}



def test_humaneval_task_files_include_the_plain_one(tmp_path):
    """The HumanEval variants start from sc_humaneval.yaml (`include:`); the configs handed to lm-eval, and the
    files written for its CLI, are whole: the shared data and prompt, each variant's own sampling and scorer."""
    import yaml

    from sparsecraft.evaluate.tasks import task_config, write_task_dir

    plain = task_config("sc_humaneval")
    for name in ("sc_humaneval_chat", "sc_humaneval_sampled", "sc_humaneval_chat_sampled"):
        config = task_config(name)
        assert config["task"] == name and "include" not in config
        for key in ("dataset_path", "dataset_kwargs", "test_split", "doc_to_text", "doc_to_target", "unsafe_code"):
            assert config[key] == plain[key], (name, key)
    chat_sampled = task_config("sc_humaneval_chat_sampled")
    assert chat_sampled["repeats"] == 10 and chat_sampled["generation_kwargs"]["do_sample"] is True
    assert "<|im_end|>" in chat_sampled["generation_kwargs"]["until"]
    assert chat_sampled["process_results"] is humaneval.process_sampled_any_completion
    written = yaml.safe_load((write_task_dir(tmp_path, ("sc_humaneval_chat_sampled",))
                              / "sc_humaneval_chat_sampled.yaml").read_text().replace("!function", ""))
    assert "include" not in written and written["dataset_kwargs"] == plain["dataset_kwargs"]


# ------------------------------------------------------------------------------------------ suites and names


@needs_lm_eval
def test_task_syntax_and_suites():
    assert parse_tasks("sc_math_mc, sc_math_gen:5,sc_math_mc") == [TaskRequest("sc_math_mc"),
                                                                   TaskRequest("sc_math_gen", 5)]
    assert [r.name for r in parse_tasks("local")] == [n for n, _ in SUITES["local"]]
    paper = {r.name: r.num_fewshot for r in parse_tasks("paper")}
    assert paper["mmlu"] == 5 and paper["gsm8k"] == 5 and paper["hellaswag"] == 10 and paper["sc_humaneval"] == 0
    for bad in ("", "sc_math_mc:x", "paper:3"):
        with pytest.raises(ConfigError):
            parse_tasks(bad)
    with pytest.raises(ConfigError, match="unknown task"):
        prepare_tasks([TaskRequest("no_such_task_xyz")])


@needs_lm_eval
def test_hub_task_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and this machine has no network
    with pytest.raises(ConfigError, match="hub"):
        prepare_tasks([TaskRequest("arc_easy")])


# ------------------------------------------------------------------------------------------------ quick eval


def _conversation_loss(model, tok, messages: list[tuple[str, str]]) -> tuple[float, int]:
    """Summed answer-token cross-entropy of one conversation, computed by hand (ChatML, one sequence)."""
    text, answer_chars = "", []
    for role, content in messages:
        head = f"<|im_start|>{role}\n"
        if role == "assistant":
            start = len(text) + len(head)
            answer_chars.append((start, start + len(content) + len("<|im_end|>")))
        text += f"{head}{content}<|im_end|>\n"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor([enc["input_ids"]])
    trained = [any(s <= a < e for s, e in answer_chars) for a, _ in enc["offset_mapping"]]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    total, count = 0.0, 0
    for t in range(1, ids.shape[1]):
        if trained[t]:
            total -= float(logp[t - 1, ids[0, t]])
            count += 1
    return total, count


def test_quick_eval_matches_hand_computation(tmp_path):
    from sparsecraft.data import DataSource
    from sparsecraft.evaluate.quick import QuickSettings, quick_eval

    math_rows = read_jsonl(REPO / "data" / "quickstart" / "heldout" / "math.jsonl")[:3]
    alpaca_rows = read_jsonl(REPO / "data" / "quickstart" / "heldout" / "alpaca.jsonl")[:2]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in math_rows))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows))
    model, tok = tiny_llama(seed=1), char_tokenizer()
    settings = QuickSettings([DataSource(str(tmp_path / "m.jsonl"), name="math"),
                              DataSource(str(tmp_path / "a.jsonl"), name="general")], max_length=4096)
    result = quick_eval(model, tok, settings, batch_size=2)  # batches mix lengths: padding must not count
    convs = {"math": [[("user", r["query"]), ("assistant", r["response"])] for r in math_rows],
             "general": [[("user", f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"]),
                          ("assistant", r["output"])] for r in alpaca_rows]}
    grand = [0.0, 0]
    for name, conversations in convs.items():
        sums = [_conversation_loss(model, tok, c) for c in conversations]
        total, count = sum(s for s, _ in sums), sum(n for _, n in sums)
        grand[0] += total
        grand[1] += count
        got = result["sources"][name]
        assert got["tokens"] == count and got["samples"] == len(conversations)
        assert got["loss"] == pytest.approx(total / count, abs=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result["loss"] == pytest.approx(grand[0] / grand[1], abs=1e-5)


def test_quick_eval_limit_takes_the_first_records_of_each_source(tmp_path):
    """`--limit` as lm-eval reads it (a count per source, or a fraction of each below 1): the first records."""
    from sparsecraft.data import DataSource
    from sparsecraft.evaluate.quick import QuickSettings, quick_eval

    rows = read_jsonl(REPO / "data" / "quickstart" / "heldout" / "math.jsonl")[:6]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "first2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (tmp_path / "first3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    model, tok = tiny_llama(seed=1), char_tokenizer()

    def run(path, limit=None):
        settings = QuickSettings([DataSource(str(tmp_path / path), name="math")], max_length=4096)
        return quick_eval(model, tok, settings, batch_size=2, limit=limit)

    assert run("m.jsonl", limit=2) == run("first2.jsonl")
    assert run("m.jsonl", limit=0.5) == run("first3.jsonl")
    assert run("m.jsonl", limit=2)["samples"] == 2


def test_quick_data_from_files_recipes_and_trained_models(tmp_path):
    from sparsecraft.evaluate.quick import default_settings, parse_data_args

    heldout = REPO / "data" / "quickstart" / "heldout"
    assert [s.display_name for s in default_settings().sources] == ["math", "code", "general", "general"]
    files = parse_data_args([f"maths={heldout / 'math.jsonl'}", str(heldout / "code.jsonl")])
    assert [s.display_name for s in files.sources] == ["maths", "code"]
    data = {"eval_sources": [{"path": str(heldout / "math.jsonl"), "name": "m"}], "template": "chatml",
            "max_length": 200}
    (tmp_path / "r.yaml").write_text(json.dumps({"model": "x", "data": data}))  # JSON is YAML
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"recipe": {"data": data}}))
    for arg in (tmp_path / "r.yaml", tmp_path / "model"):
        got = parse_data_args([str(arg)])
        assert [s.display_name for s in got.sources] == ["m"] and (got.template, got.max_length) == ("chatml", 200)
    (tmp_path / "bare").mkdir()
    with pytest.raises(ConfigError, match="training recipe"):
        parse_data_args([str(tmp_path / "bare")])


# ------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def run_cli(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "eval", eval_cmd)  # as the lead registers it

    def run(*argv: str) -> tuple[int, str, str]:
        try:
            code = cli.main(["eval", *argv])
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def test_cli_lists_tasks(run_cli):
    code, out, _ = run_cli("--list-tasks")
    assert code == 0 and out.splitlines() == list(LOCAL_TASKS)


@pytest.mark.parametrize("argv, message", [
    ((), "MODEL"),
    (("m", "--limit", "0"), "--limit"),
    (("m", "--limit", "2.5"), "--limit"),
    (("m", "--batch-size", "zero"), "--batch-size"),
    (("m", "--num-fewshot", "-1"), "--num-fewshot"),
    (("m", "--data", "x.jsonl"), "--quick"),
    (("m", "--tasks", "sc_humaneval"), "--allow-code-execution"),
    (("m", "--tasks", "no_such_task_xyz"), "unknown task"),
    (("m", "--tasks", "sc_math_mc:two"), "whole number"),
    (("m", "--quick", "--data", "/nonexistent/file.jsonl"), "no such file"),
    (("m", "--num-fewshot", "many"), "invalid int"),
])
def test_cli_bad_input_exits_2(run_cli, argv, message):
    code, _, err = run_cli(*argv)
    assert code == 2
    assert message in err and "Traceback" not in err


@needs_lm_eval
def test_cli_end_to_end_on_a_saved_model(run_cli, tmp_path):
    model_dir, out = tmp_path / "run" / "model", tmp_path / "out"
    tiny_llama(seed=2).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    code, stdout, err = run_cli(str(model_dir), "--tasks", "sc_math_mc,sc_math_gen", "--limit", "3", "--quick",
                                "--log-samples", "--out", str(out))
    assert code == 0, err
    generated = [json.loads(line) for line in (out / "samples" / "sc_math_gen.jsonl").read_text().splitlines()]
    assert sorted({s["doc_id"] for s in generated}) == [0, 1, 2]  # once per document and filter
    assert len(generated) == 3 * len({s["filter"] for s in generated})
    assert all(isinstance(s["resps"][0][0], str) and "exact_match" in str(s) for s in generated)
    assert len((out / "samples" / "sc_math_mc.jsonl").read_text().splitlines()) == 3
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == str(model_dir)
    assert set(results["tasks"]) == {"sc_math_mc", "sc_math_gen"}
    assert 0.0 <= results["tasks"]["sc_math_mc"]["acc"] <= 1.0
    assert results["settings"]["limit"] == 3 and results["settings"]["samples"]["sc_math_mc"] == 3
    quick = json.loads((out / "quick.json").read_text())
    assert set(quick["sources"]) == {"math", "code", "general"}  # the bundled held-out split, named as trained
    for row in quick["sources"].values():
        assert row["perplexity"] == pytest.approx(math.exp(row["loss"]))
    assert (out / "results.md").read_text().count("| sc_math_mc |") == 2  # acc and acc_norm rows
    assert "sc_math_gen" in stdout and not list(out.glob(".*tmp"))


def test_missing_lm_eval_is_one_line_naming_the_extra(run_cli, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "sparsecraft.evaluate.lm_eval_bridge", raising=False)
    code, _, err = run_cli("some-model", "--tasks", "sc_math_mc")
    assert code == 2 and 'pip install "sparsecraft[eval]"' in err and len(err.strip().splitlines()) == 1


def test_quick_row_with_a_non_finite_loss_is_written_as_no_number(tmp_path):
    """An overflowing (NaN/inf) loss must not lose the results: JSON has no NaN, the table says n/a."""
    import json as _json

    from sparsecraft.evaluate.quick import _row
    from sparsecraft.evaluate.results import write_quick

    row = _row(float("nan"), 10, 2)
    assert row["loss"] is None and row["perplexity"] is None
    quick = {"sources": {"math": row}, **_row(float("inf"), 10, 2), "dropped": {}}
    write_quick(tmp_path, "m", quick, {})
    assert _json.loads((tmp_path / "quick.json").read_text())["sources"]["math"]["loss"] is None
    assert "n/a" in (tmp_path / "quick.md").read_text()


def test_generated_code_leaves_no_children_and_bounded_stderr():
    """A passing program's background child is killed with it; stderr is read from a size-limited file."""
    from sparsecraft.evaluate.humaneval import run_program

    marker = "sparsecraft-orphan-check"
    program = (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)  # {marker}'])\n"
        "print('x' * 1000, file=sys.stderr)\n"
    )
    result = run_program(program, timeout=10)
    assert result.passed
    import subprocess as _sp
    import time as _time

    _time.sleep(0.5)
    ps = _sp.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert marker not in ps
