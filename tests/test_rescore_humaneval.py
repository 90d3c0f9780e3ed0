"""scripts/rescore_humaneval.py: kept answers scored again with today's extraction; samples and means rewritten."""
import gzip
import json

import pytest
from conftest import load_script

from sparsecraft.evaluate import humaneval


@pytest.fixture(scope="module")
def rescore():
    return load_script("rescore_humaneval")


def test_sampled_answers_are_scored_again_and_the_old_means_kept(tmp_path, rescore):
    problems = humaneval.load_problems()[:2]
    # problem 0: three right answers in a shape the old extraction lost (code, then a closing fence and prose)
    right = [f"{p['prompt']}{p['canonical_solution']}```\nThat is it." for p in problems]
    rows = [{"doc": problems[0], "filter": "sampled", "filtered_resps": [[right[0]] * 3 + ["nope"] * 7],
             "pass@1": 0.0, "pass@5": 0.0, "pass@10": 0.0},
            {"doc": problems[1], "filter": "sampled", "filtered_resps": [["nope"] * 10],
             "pass@1": 0.0, "pass@5": 0.0, "pass@10": 0.0}]
    folder = tmp_path / "eval-humaneval-chat-sampled"
    folder.mkdir()
    (folder / "samples.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    task = "sc_humaneval_chat_sampled"
    (folder / "results.json").write_text(json.dumps({"tasks": {task: {"pass@1/sampled": 0.0}}, "settings": {}}))
    assert rescore.main([str(folder)]) == 0
    results = json.loads((folder / "results.json").read_text())
    assert results["tasks"][task]["pass@1/sampled"] == pytest.approx(0.15)  # (0.3 + 0) / 2
    assert results["tasks"][task]["pass@10/sampled"] == pytest.approx(0.5)
    assert results["tasks"][task]["pass@1_stderr/sampled"] == pytest.approx(0.15)  # stdev 0.2121 / sqrt(2)
    assert results["before_rescoring"][task]["pass@1/sampled"] == 0.0
    assert results["settings"]["rescored"]["by"] == "scripts/rescore_humaneval.py"
    with gzip.open(folder / "samples.jsonl.gz", "rt") as f:
        kept = [json.loads(line) for line in f]
    assert [r["pass@1"] for r in kept] == pytest.approx([0.3, 0.0]) and kept[0]["doc"] == problems[0]


def test_a_folder_without_results_is_one_line_error(tmp_path, rescore, capsys):
    assert rescore.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path} has no results.json"
