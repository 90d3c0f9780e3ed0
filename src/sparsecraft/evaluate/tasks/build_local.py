"""Build the bundled lm-eval task data from the quickstart instruction set (offline, deterministic).

    python -m sparsecraft.evaluate.tasks.build_local              # rewrites evaluate/tasks/data/*.jsonl
    python -m sparsecraft.evaluate.tasks.build_local --out DIR    # writes DIR/*.jsonl instead
    python -m sparsecraft.evaluate.tasks.build_local --data DIR   # reads DIR/{heldout,train}/*.jsonl

The `sc_indep_*` tasks come from `data/independent/` instead: a second held-out set written by hand in formats
the training data does not use (short answers, prose arithmetic, HumanEval-style stubs); copied here as they are.

Test docs come from `data/quickstart/heldout/`, few-shot docs from the first records of `data/quickstart/train/`
(never the test questions). Wrong choices of the multiple-choice tasks are built here, once, with seeded
`random.Random` generators keyed by the question text (no wall clock, no hash order), so rerunning the script
gives byte-identical files; `tests/test_eval.py` checks that the committed files match. The gold position is
balanced over the choices, so a model that always picks one position scores chance, not more.

- math: wrong answers are the worked solution's own intermediate results (an answer "stopped one step early"),
  topped up with near misses of the right answer (±1, ±10, ×2, ÷2).
- general / code: wrong answers are other questions' answers (a distractor pool from the same split).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from fractions import Fraction
from pathlib import Path

SEED = 2401_02731  # the paper's arXiv number: any fixed value would do
NUM_CHOICES = 4
FEWSHOT_RECORDS = 10  # few-shot docs per task, taken from the train split
REPO_DATA = Path(__file__).resolve().parents[4] / "data" / "quickstart"
INDEPENDENT_DATA = REPO_DATA.parent / "independent"
OUT_DIR = Path(__file__).resolve().parent / "data"

_ANSWER = re.compile(r"The answer is:\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)\s*$")
_STEP_RESULT = re.compile(r"=\s*\$?(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
_CODE_BLOCK = re.compile(r"```(?:python)?\n(.*?)```", re.DOTALL)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _fmt(x: Fraction) -> str:
    """Decimal text as the math data writes numbers: `4500`, `13.5`, `0.25`."""
    if x.denominator == 1:
        return str(x.numerator)
    return f"{float(x):.2f}".rstrip("0").rstrip(".")


def _num(text: str) -> Fraction:
    return Fraction(text.replace(",", ""))


def _gold_positions(n: int, tag: str) -> list[int]:
    """Gold index per item, every position used equally often (±1), in a seeded order."""
    order = list(range(n))
    random.Random(f"{SEED}:{tag}:gold").shuffle(order)
    gold = [0] * n
    for rank, item in enumerate(order):
        gold[item] = rank % NUM_CHOICES
    return gold


def _prefix_clash(a: str, b: str) -> bool:
    """One choice begins with the other: a perfect model gives the shorter one at least the longer one's
    likelihood, so such a wrong choice could beat the right one under summed log-likelihood."""
    return a.startswith(b) or b.startswith(a)


def _place(correct: str, wrong: list[str], gold: int) -> list[str]:
    choices = list(wrong[: NUM_CHOICES - 1])
    choices.insert(gold, correct)
    return choices


# ------------------------------------------------------------------------------------------------------- math

def math_answer(response: str) -> str:
    match = _ANSWER.search(response.strip())
    if match is None:
        raise ValueError(f"math response without a final 'The answer is: N' line: {response[-60:]!r}")
    return match.group(1)


def math_distractors(question: str, response: str) -> list[str]:
    """Three wrong numeric answers: intermediate results of the worked solution, then near misses."""
    answer = _num(math_answer(response))
    right = _fmt(answer)
    rng = random.Random(f"{SEED}:math:{question}")
    seen = {answer}

    def usable(value: Fraction) -> bool:
        return value > 0 and value not in seen and not _prefix_clash(_fmt(value), right)

    steps = []
    for text in _STEP_RESULT.findall(response):
        value = _num(text)
        if usable(value):
            seen.add(value)
            steps.append(value)
    rng.shuffle(steps)
    picked = steps[:2]  # keep room for at least one near miss
    near = [answer + 1, answer - 1, answer + 10, answer * 2, answer / 2, answer - 10, answer + 2, answer + 3,
            answer + 20, answer * 3]
    rng.shuffle(near)
    for value in near:
        if len(picked) == NUM_CHOICES - 1:
            break
        if usable(value):
            seen.add(value)
            picked.append(value)
    if len(picked) < NUM_CHOICES - 1:
        raise ValueError(f"math: too few wrong answers for {question[:60]!r}")
    return [_fmt(v) for v in picked]


def build_math(records: list[dict], tag: str) -> tuple[list[dict], list[dict]]:
    """(multiple-choice docs, generation docs) from MetaMathQA-layout records."""
    golds = _gold_positions(len(records), f"math-{tag}")
    mc, gen = [], []
    for i, (record, gold) in enumerate(zip(records, golds)):
        question, response = record["query"].strip(), record["response"].strip()
        answer = math_answer(response)
        mc.append({"id": f"math-{tag}-{i:03d}", "question": question,
                   "choices": _place(answer, math_distractors(question, response), gold), "gold": gold,
                   "answer": answer})
        gen.append({"id": f"math-{tag}-{i:03d}", "question": question, "solution": response, "answer": answer})
    return mc, gen


# ---------------------------------------------------------------------------------------------------- general

_ROLE = {"system": "System", "human": "User", "gpt": "Assistant"}


def dialogue(record: dict) -> tuple[str, str]:
    """(context ending in `Assistant:`, last answer) of a ShareGPT or Alpaca record."""
    if "conversations" in record:
        turns = record["conversations"]
        lines = [f"{_ROLE[t['from']]}: {t['value'].strip()}" for t in turns[:-1]]
        answer = turns[-1]["value"].strip()
    else:
        user = record["instruction"].strip()
        if record.get("input", "").strip():
            user += "\n\n" + record["input"].strip()
        lines, answer = [f"User: {user}"], record["output"].strip()
    return "\n".join(lines + ["Assistant:"]), answer


def _pool_distractors(answers: list[str], i: int, tag: str) -> list[str]:
    others = [j for j in range(len(answers)) if j != i and not _prefix_clash(answers[j], answers[i])]
    rng = random.Random(f"{SEED}:{tag}:{answers[i]}")
    picked: list[str] = []
    for j in rng.sample(others, len(others)):
        if answers[j] not in picked:
            picked.append(answers[j])
        if len(picked) == NUM_CHOICES - 1:
            break
    if len(picked) < NUM_CHOICES - 1:
        raise ValueError(f"{tag}: too few distinct answers to build {NUM_CHOICES} choices")
    return picked


def build_general(records: list[dict], sources: list[str], tag: str) -> list[dict]:
    pairs = [dialogue(r) for r in records]
    answers = [a for _, a in pairs]
    golds = _gold_positions(len(records), f"general-{tag}")
    return [{"id": f"general-{tag}-{i:03d}", "source": src, "context": ctx,
             "choices": _place(ans, _pool_distractors(answers, i, f"general-{tag}"), gold), "gold": gold}
            for i, ((ctx, ans), src, gold) in enumerate(zip(pairs, sources, golds))]


# ------------------------------------------------------------------------------------------------------- code

def solution_code(solution: str) -> str:
    match = _CODE_BLOCK.search(solution)
    if match is None:
        raise ValueError(f"code solution without a ```python block: {solution[:60]!r}")
    return match.group(1).rstrip() + "\n"


def build_code(records: list[dict], tag: str) -> list[dict]:
    codes = [solution_code(r["solution"]) for r in records]
    golds = _gold_positions(len(records), f"code-{tag}")
    return [{"id": f"code-{tag}-{i:03d}", "problem": r["problem"].strip(),
             "choices": _place(code, _pool_distractors(codes, i, f"code-{tag}"), gold), "gold": gold}
            for i, (r, code, gold) in enumerate(zip(records, codes, golds))]


# ------------------------------------------------------------------------------------------------ independent

def build_independent(indep_dir: Path) -> dict[str, list[dict]]:
    """`indep_qa_test` (math + general short answers) and `indep_code_test` (HumanEval layout) from the
    independent held-out set's messages-layout records."""
    qa = []
    for domain in ("math", "general"):
        for record in read_jsonl(indep_dir / f"{domain}.jsonl"):
            qa.append({"id": record["id"], "domain": domain, "question": record["messages"][0]["content"],
                       "answers": record["answers"]})
    code = [{"task_id": r["id"], "prompt": r["prompt"], "canonical_solution": r["canonical_solution"],
             "test": r["test"], "entry_point": r["entry_point"]} for r in read_jsonl(indep_dir / "code.jsonl")]
    return {"indep_qa_test": qa, "indep_code_test": code}


# -------------------------------------------------------------------------------------------------------- all

def build(data_dir: Path = REPO_DATA, out_dir: Path = OUT_DIR, indep_dir: Path = INDEPENDENT_DATA) -> list[Path]:
    """Write every task file into `out_dir`; returns the paths written."""
    data_dir, out_dir, indep_dir = Path(data_dir), Path(out_dir), Path(indep_dir)
    missing = [p for p in (data_dir / "heldout", data_dir / "train", indep_dir) if not p.is_dir()]
    if missing:
        raise SystemExit(f"error: {missing[0]} not found (pass --data DIR holding heldout/ and train/)")
    files: dict[str, list[dict]] = {}
    for split, tag in (("heldout", "test"), ("train", "train")):
        src = data_dir / split
        take = (lambda rows: rows) if split == "heldout" else (lambda rows: rows[:FEWSHOT_RECORDS])
        math = take(read_jsonl(src / "math.jsonl"))
        general = read_jsonl(src / "general.jsonl")
        alpaca = read_jsonl(src / "alpaca.jsonl")
        if split == "train":  # a few of each layout, so few-shot prompts show both
            general, alpaca = general[: FEWSHOT_RECORDS - 3], alpaca[:3]
        code = take(read_jsonl(src / "code.jsonl"))
        files[f"math_mc_{tag}"], files[f"math_gen_{tag}"] = build_math(math, tag)
        files[f"general_mc_{tag}"] = build_general(general + alpaca, ["general"] * len(general)
                                                   + ["alpaca"] * len(alpaca), tag)
        files[f"code_mc_{tag}"] = build_code(code, tag)
    files.update(build_independent(indep_dir))
    written = []
    for name, rows in files.items():
        path = out_dir / f"{name}.jsonl"
        write_jsonl(path, rows)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_DATA, help="folder with heldout/ and train/")
    parser.add_argument("--independent", type=Path, default=INDEPENDENT_DATA,
                        help="folder with the independent held-out set (math, general, code .jsonl)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where the task files go")
    args = parser.parse_args(argv)
    for path in build(args.data, args.out, args.independent):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
