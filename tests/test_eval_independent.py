"""The independent held-out set (data/independent/) and its tasks: kept apart from the training data, in other
formats, scored by short-answer matching and by running code."""

from __future__ import annotations

import json
import re

import pytest
from test_eval import REPO, TASK_DATA, ScriptedLM, char_tokenizer, evaluate, needs_lm_eval, read_jsonl

from sparsecraft.data import DataSource, load_source
from sparsecraft.evaluate import humaneval
from sparsecraft.evaluate.short_answer import normalise, score
from sparsecraft.evaluate.suites import parse_tasks

INDEPENDENT = REPO / "data" / "independent"
QUICKSTART = REPO / "data" / "quickstart"


def _words(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def _quickstart_questions() -> set[str]:
    questions = set()
    for path in QUICKSTART.glob("*/*.jsonl"):
        for record in read_jsonl(path):
            for key in ("query", "problem", "instruction"):
                if key in record:
                    questions.add(_words(record[key]))
            turns = record.get("conversations", [])
            questions |= {_words(turn["value"]) for turn in turns if turn["from"] == "human"}
    return questions


def test_independent_set_is_apart_from_the_training_data_and_its_formats():
    seen = _quickstart_questions()
    for domain, count in (("math", 24), ("general", 24), ("code", 16)):
        records = read_jsonl(INDEPENDENT / f"{domain}.jsonl")
        assert len(records) == count
        for record in records:
            question, answer = (m["content"] for m in record["messages"])
            assert _words(question) not in seen, question
            assert "The answer is:" not in answer and "```" not in answer  # not the training formats
        # the trainer reads it as it is: messages layout, nothing skipped
        loaded, report = load_source(DataSource(path=str(INDEPENDENT / f"{domain}.jsonl")))
        assert len(loaded) == count and report.read == report.valid == count


def test_every_reference_solution_passes_its_tests_and_a_wrong_one_fails():
    problems = read_jsonl(TASK_DATA / "indep_code_test.jsonl")
    assert len(problems) == 16 and not {p["entry_point"] for p in problems} & {
        "count_vowels", "second_largest", "is_leap_year", "chunk", "merge_sorted"}  # training's functions
    with humaneval.allow_code_execution():
        for problem in problems:
            assert humaneval.check_completion(problem, problem["canonical_solution"]).passed, problem["task_id"]
        assert not humaneval.check_completion(problems[0], "    return None\n").passed


@pytest.mark.parametrize("response, answers, match, exact", [
    ("Nairobi.", ["nairobi"], 1, 1),
    ("The capital of Kenya is Nairobi.", ["nairobi"], 1, 0),
    ("It makes 10,080 minutes in all.", ["10080"], 1, 0),
    ("11:35", ["11:35"], 1, 1),
    ("The Indian Ocean", ["indian ocean"], 1, 1),
    ("1080", ["108"], 0, 0),  # whole words only
    ("I am not sure.\nNairobi", ["nairobi"], 0, 0),  # only the first line counts
    ("\n\n  Eight legs.", ["8", "eight"], 1, 0),
    ("", ["nairobi"], 0, 0),
])
def test_short_answer_scores(response, answers, match, exact):
    assert score(response, answers) == {"match": float(match), "exact_match": float(exact)}


def test_normalise_drops_articles_punctuation_and_thousands_separators():
    assert normalise("The Nile, 6,650 km long!") == "nile 6650 km long"
    assert normalise("A  butterfly") == "butterfly"


def test_independent_suite_names_both_tasks():
    assert [(r.name, r.num_fewshot) for r in parse_tasks("independent")] == [("sc_indep_qa", 0),
                                                                             ("sc_indep_code", 0)]


@needs_lm_eval
def test_short_answer_task_through_lm_eval():
    tok = char_tokenizer()
    docs = read_jsonl(TASK_DATA / "indep_qa_test.jsonl")[:6]
    prompts = [f"Question: {d['question']}\nAnswer:" for d in docs]
    sentence = ScriptedLM(tok, answers={p: f" It is {d['answers'][0]}.\n\nQuestion: next"
                                        for p, d in zip(prompts, docs)})
    wrong = ScriptedLM(tok, answers={p: " I do not know." for p in prompts})
    scores = evaluate(sentence, "sc_indep_qa", tokenizer=tok, limit=6)["sc_indep_qa"]
    assert scores["match"] == 1.0 and scores["exact_match"] == 0.0
    assert evaluate(wrong, "sc_indep_qa", tokenizer=tok, limit=6)["sc_indep_qa"]["match"] == 0.0


@needs_lm_eval
def test_independent_code_task_runs_code_only_when_allowed():
    tok = char_tokenizer()
    problems = read_jsonl(TASK_DATA / "indep_code_test.jsonl")[:3]
    right = ScriptedLM(tok, answers={p["prompt"]: p["canonical_solution"] for p in problems})
    assert evaluate(right, "sc_indep_code", tokenizer=tok, limit=3,
                    allow_code_execution=True)["sc_indep_code"]["pass@1"] == 1.0
    with pytest.raises(humaneval.CodeExecutionRefused, match="--allow-code-execution"):
        evaluate(right, "sc_indep_code", tokenizer=tok, limit=3)


def test_task_files_copy_the_independent_set():
    qa = read_jsonl(TASK_DATA / "indep_qa_test.jsonl")
    assert [d["domain"] for d in qa] == ["math"] * 24 + ["general"] * 24
    first = json.loads((INDEPENDENT / "math.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert qa[0]["question"] == first["messages"][0]["content"] and qa[0]["answers"] == first["answers"]


def test_chat_answers_and_plain_completions_both_become_programs():
    problem = read_jsonl(TASK_DATA / "indep_code_test.jsonl")[0]  # initials(full_name)
    body = problem["canonical_solution"]
    whole = problem["prompt"] + body
    answers = {
        "fenced chat answer": f"Here it is:\n```python\n{whole}```\nIt joins the first letters.",
        "unfenced whole function": whole,
        "plain body continuation": body + "\n\nprint(initials('a b'))\n",
        "unterminated fence": f"```python\n{whole}",
        "closing fence only": f"{whole}```",
    }
    with humaneval.allow_code_execution():
        for what, answer in answers.items():
            assert humaneval.process_any_completion(problem, [answer]) == {"pass@1": 1.0}, what
        wrong = "```python\ndef initials(full_name):\n    return full_name\n```"
        assert humaneval.process_any_completion(problem, [wrong]) == {"pass@1": 0.0}
    assert humaneval.completion_as_code(problem, body + "\nx = 1\n").rstrip() == body.rstrip()  # cut at the end
