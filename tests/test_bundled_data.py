"""The bundled quickstart instruction data (data/quickstart/): structure, counts, splits and correctness.

Math answers are checked twice: every ``a op b = c`` step in a response is re-evaluated with exact fractions and
the final ``The answer is: N`` must equal the last step's result; and data/make_math.py (which checks each answer
against a separate closed-form computation) must regenerate the shipped files byte for byte. Every code solution is
executed with its asserts, one subprocess per file.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "quickstart"
SPLITS = ("train", "heldout")
DOMAINS = ("math", "code", "general", "alpaca")

# expected record counts per file (inclusive ranges)
COUNTS = {
    ("train", "math"): (110, 150), ("heldout", "math"): (15, 35),
    ("train", "code"): (90, 130), ("heldout", "code"): (12, 30),
    ("train", "general"): (100, 150), ("heldout", "general"): (12, 35),
    ("train", "alpaca"): (25, 50), ("heldout", "alpaca"): (4, 12),
}
FIELDS = {"math": ("query", "response"), "code": ("problem", "solution"), "alpaca": ("instruction", "output")}


def load(split: str, domain: str) -> list[dict]:
    path = DATA / split / f"{domain}.jsonl"
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            assert line.endswith("\n") and line.strip(), f"{path}:{n}: blank line or missing newline"
            rec = json.loads(line)
            assert isinstance(rec, dict), f"{path}:{n}: not a JSON object"
            records.append(rec)
    return records


def question(domain: str, rec: dict) -> str:
    """The text that identifies a record's task, normalised (case, spacing, punctuation)."""
    if domain == "math":
        text = rec["query"]
    elif domain == "code":
        text = rec["problem"]
    elif domain == "alpaca":
        text = rec["instruction"] + " || " + rec["input"]
    else:
        text = next(t["value"] for t in rec["conversations"] if t["from"] == "human")
    return re.sub(r"[^a-z0-9|]+", " ", text.lower()).strip()


def nonempty(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


# ------------------------------------------------------------------------------------------ structure and splits

@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("domain", DOMAINS)
def test_records_well_formed(split, domain):
    recs = load(split, domain)
    lo, hi = COUNTS[(split, domain)]
    assert lo <= len(recs) <= hi, f"{split}/{domain}: {len(recs)} records, expected {lo}..{hi}"
    for i, rec in enumerate(recs):
        where = f"{split}/{domain}.jsonl record {i}"
        if domain == "general":
            conv = rec.get("conversations")
            assert isinstance(conv, list) and conv, where
            for turn in conv:
                assert set(turn) == {"from", "value"}, where
                assert nonempty(turn["value"]), where
            roles = [t["from"] for t in conv]
            body = roles[1:] if roles[0] == "system" else roles
            assert body and len(body) % 2 == 0, f"{where}: roles {roles}"
            assert body == ["human", "gpt"] * (len(body) // 2), f"{where}: roles must alternate human/gpt: {roles}"
            continue
        for field in FIELDS[domain]:
            assert nonempty(rec.get(field)), f"{where}: {field!r} missing or empty"
        if domain == "alpaca":
            assert isinstance(rec.get("input"), str), where
            assert set(rec) == {"instruction", "input", "output"}, where
        if domain == "math":
            assert set(rec) == {"query", "response"}, where
            assert re.search(r"\nThe answer is: -?\d+(?:\.\d+)?$", rec["response"]), where
        if domain == "code":
            assert set(rec) == {"problem", "solution", "tests"}, where
            assert rec["solution"].count("```python\n") == 1 and rec["solution"].count("```") == 2, where
            explanation = rec["solution"].rsplit("```", 1)[1]
            assert nonempty(explanation), f"{where}: no explanation after the code block"
            tests = rec["tests"]
            assert isinstance(tests, list) and tests and all(nonempty(t) for t in tests), where
            for t in tests:
                tree = ast.parse(t)
                assert any(isinstance(node, ast.Assert) for node in ast.walk(tree)), f"{where}: no assert in {t!r}"


@pytest.mark.parametrize("domain", DOMAINS)
def test_splits_disjoint_and_no_duplicates(domain):
    seen = {}
    for split in SPLITS:
        for rec in load(split, domain):
            key = question(domain, rec)
            assert key not in seen, f"{domain}: duplicate question ({seen[key]} and {split}): {key[:80]}"
            seen[key] = split
    n_held = sum(1 for s in seen.values() if s == "heldout")
    assert 0.08 <= n_held / len(seen) <= 0.25, f"{domain}: heldout share {n_held}/{len(seen)}"


def test_general_mix_of_conversation_shapes():
    recs = [r for split in SPLITS for r in load(split, "general")]
    with_system = sum(r["conversations"][0]["from"] == "system" for r in recs)
    multi_turn = sum(sum(t["from"] == "human" for t in r["conversations"]) >= 2 for r in recs)
    assert with_system >= 15 and multi_turn >= 15, (with_system, multi_turn)


def test_answers_are_short():
    """Short records keep CPU fine-tuning quick: nearly all answers are at most 600 characters, none above 1500."""
    lengths = []
    for split in SPLITS:
        for domain in DOMAINS:
            for r in load(split, domain):
                if domain == "general":
                    lengths += [len(t["value"]) for t in r["conversations"] if t["from"] == "gpt"]
                else:
                    lengths.append(len(r[FIELDS[domain][1]]))
    assert max(lengths) <= 1500
    assert sum(n <= 600 for n in lengths) >= 0.95 * len(lengths)


# ------------------------------------------------------------------------------------------ math correctness

_NUM = r"\$?\d+(?:\.\d+)?"
_OPERAND = rf"\(?{_NUM}\)?"
_STEP = re.compile(rf"({_OPERAND}(?:\s*[-+×÷]\s*{_OPERAND})+)\s*=\s*(-?{_NUM})")


def _exact(expr: str) -> Fraction:
    expr = expr.replace("$", "").replace("×", "*").replace("÷", "/")
    expr = re.sub(r"\d+(?:\.\d+)?", lambda m: f"F('{m.group()}')", expr)
    return eval(expr, {"__builtins__": {}, "F": Fraction})  # only digits, operators, parentheses and F(...)


@pytest.mark.parametrize("split", SPLITS)
def test_math_steps_and_answers(split):
    for rec in load(split, "math"):
        body, final = rec["response"].rsplit("\nThe answer is: ", 1)
        steps = _STEP.findall(body)
        assert steps, f"no worked steps in: {rec['query']}"
        for lhs, rhs in steps:
            assert _exact(lhs) == Fraction(rhs.replace("$", "")), f"wrong step {lhs} = {rhs} in: {rec['query']}"
        last = Fraction(steps[-1][1].replace("$", ""))
        assert Fraction(final) == last, f"answer is not the last result: {rec['query']}"


def test_make_math_regenerates_shipped_files(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "data" / "make_math.py"), str(tmp_path)], check=True, timeout=60)
    for split in SPLITS:
        assert (tmp_path / split / "math.jsonl").read_bytes() == (DATA / split / "math.jsonl").read_bytes(), split


# ------------------------------------------------------------------------------------------ code correctness

_RUNNER = r'''
import json, re, sys, traceback
failures = []
with open(sys.argv[1], encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
for i, rec in enumerate(records):
    code = re.search(r"```python\n(.*?)```", rec["solution"], re.S).group(1)
    ns = {"__name__": f"record_{i}"}
    try:
        exec(compile(code, f"record_{i}", "exec"), ns)
        for t in rec["tests"]:
            exec(compile(t, f"record_{i}_test", "exec"), ns)
    except BaseException:
        failures.append({"index": i, "problem": rec["problem"][:80], "error": traceback.format_exc(limit=1)})
print(json.dumps({"n": len(records), "failures": failures}))
'''


def run_code_file(path: Path, workdir: Path) -> dict:
    """Execute every record of a code JSONL file (solution, then its tests) in one subprocess."""
    runner = workdir / "run_code_records.py"
    runner.write_text(_RUNNER, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(runner), str(path)], capture_output=True, text=True, timeout=60,
                          cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("split", SPLITS)
def test_code_solutions_pass_their_tests(split, tmp_path):
    result = run_code_file(DATA / split / "code.jsonl", tmp_path)
    assert result["n"] == len(load(split, "code"))
    assert not result["failures"], json.dumps(result["failures"], indent=1)


def test_code_runner_catches_wrong_solutions(tmp_path):
    """The check above is not vacuous: a solution broken on purpose is reported."""
    rec = load("train", "code")[0]
    broken = dict(rec, solution=re.sub(r"```python\n", "```python\nraise RuntimeError('broken')\n", rec["solution"]))
    wrong = {"problem": "add", "solution": "```python\ndef add(a, b):\n    return a - b\n```\n\nWrong.",
             "tests": ["assert add(2, 2) == 4"]}
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (rec, broken, wrong)), encoding="utf-8")
    result = run_code_file(path, tmp_path)
    assert [f["index"] for f in result["failures"]] == [1, 2]
