"""scripts/humaneval_paired.py: per-model pass@k and paired differences from kept lm-eval samples."""
import gzip
import json
import sys
from pathlib import Path

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def paired():
    return load_script("humaneval_paired")


def write_run(root: Path, run: str, pass1: list[float], upit: bool = False) -> None:
    folder = root / run / ("upcycle" if upit else "") / "eval-humaneval-chat-sampled"
    folder.mkdir(parents=True)
    with gzip.open(folder / "samples.jsonl.gz", "wt") as handle:
        for i, p in enumerate(pass1):
            row = {"doc": {"task_id": f"HumanEval/{i}"}, "pass@1": str(p), "pass@5": str(min(1.0, 5 * p)),
                   "pass@10": str(float(p > 0))}
            handle.write(json.dumps(row) + "\n")


def test_paired_differences_by_problem(tmp_path, paired, capsys, monkeypatch):
    write_run(tmp_path, "a-s1", [0.3, 0.1, 0.0, 0.2])
    write_run(tmp_path, "b-s1", [0.1, 0.1, 0.1, 0.0], upit=True)  # found one level down, as an UpIT run keeps it
    a, b = paired.load(tmp_path, "a-s1"), paired.load(tmp_path, "b-s1")
    assert a["HumanEval/0"]["pass@1"] == pytest.approx(0.3) and b["HumanEval/2"]["pass@10"] == 1.0
    mean, se = paired.mean_se([0.2, 0.0, -0.1, 0.2])
    assert mean == pytest.approx(0.075) and se == pytest.approx(0.0750, abs=1e-4)
    monkeypatch.setattr(sys, "argv", ["humaneval_paired.py", str(tmp_path), "a-s1", "b-s1"])
    paired.main()
    out = capsys.readouterr().out
    assert "4 problems in common" in out
    pair = next(line for line in out.splitlines() if line.startswith("a-s1 − b-s1"))
    assert "+0.075 ± 0.075" in pair and pair.rstrip().endswith("1 / 1")  # only a solves HumanEval/3, only b HumanEval/2


def test_missing_run_is_one_line_error(tmp_path, paired):
    with pytest.raises(SystemExit, match="no sampled HumanEval answers for nope"):
        paired.load(tmp_path, "nope")
