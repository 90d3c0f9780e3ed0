"""The comparison report: every run named, seeds grouped as mean ± std, missing files handled, plots valid,
HTML self-contained, and the `sparsecraft compare` command."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from sparsecraft import cli
from sparsecraft.cli import compare as compare_cmd
from sparsecraft.errors import ConfigError
from sparsecraft.evaluate.compare import write_report
from sparsecraft.evaluate.plots import plot_loss_curves
from sparsecraft.evaluate.route_stats import RoutingStats
from sparsecraft.evaluate.routes import write_routes
from sparsecraft.evaluate.run_dirs import load_run, load_runs
from sparsecraft.evaluate.run_groups import group_runs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path, min_std: float = 0.02) -> None:
    """A PNG that matplotlib reads back, with visible content (not one flat colour)."""
    assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert float(np.std(pixels[..., :3])) > min_std, f"{path} looks blank"


def recipe(method: str, seed: int, **craft) -> dict:
    return {"model": "smollm2-135m", "method": method, "output_dir": f"runs/{method}-{seed}",
            "craft": {"num_experts": 8, "top_k": 2, **craft}, "data": {"sources": [{"path": "d.jsonl"}]},
            "train": {"max_steps": 30, "seed": seed, "batch_size": 4}, "logging": {"every": 1}}


def fake_run(root: Path, name: str, method: str, seed: int, final: float, *, summary: bool = True,
             recipe_file: bool = True, metrics: bool = True, craft: dict | None = None, extra: dict | None = None,
             steps: int = 30) -> Path:
    """A run directory as `sparsecraft train` leaves it, with a loss decaying from 3 to `final`."""
    run = root / name
    run.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    if recipe_file:
        (run / "recipe.json").write_text(json.dumps(recipe(method, seed, **(craft or {}))))
    if metrics:
        lines = [{"step": 0, "eval_loss": 3.1, "eval_loss/math": 3.0, "eval_loss/code": 3.2}]
        for step in range(1, steps + 1):
            loss = final + (3.0 - final) * math.exp(-step / 8) + float(rng.normal(0, 0.03))
            record = {"step": step, "loss": loss, "lr": 2e-4, "tokens": step * 500, "tokens_per_s": 900.0}
            if method != "dense":
                record.update(aux_loss=1.0 + 0.5 * math.exp(-step / 5), z_loss=0.2,
                              load_imbalance=1.1 + 1.5 * math.exp(-step / 6), expert_load=[[0.125] * 8] * 2)
            lines.append(record)
            if step % 10 == 0:
                lines.append({"step": step, "eval_loss": final + 0.1 + 0.5 * math.exp(-step / 8)})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if summary:
        data = {"method": method, "steps": steps, "first_loss": 3.0, "final_loss": final, "tokens": steps * 500,
                "train_seconds": steps * 0.5, "tokens_per_s": 1000.0 + 100 * seed, "eval_loss": final + 0.1,
                "eval_loss/math": final, "eval_loss/code": final + 0.2, "initial_eval_loss": 3.1,
                "trainable_params": {"dense": 1_000_000, "pesc": 1_500_000, "upcycle": 50_000_000}[method],
                "total_params": 135_000_000 + (0 if method != "upcycle" else 200_000_000),
                "peak_mem_bytes": int(1.5 * 2 ** 30), "world_size": 1, "model_dir": str(run / "model")}
        data.update(extra or {})
        (run / "summary.json").write_text(json.dumps(data))
    return run


def fake_routes(run: Path, skew: float) -> None:
    """`routes/` as `sparsecraft routes` writes it: math prefers expert 0, code expert 5, by `skew`."""
    L, E, k, n = 2, 8, 2, 400
    source_counts = torch.full((2, L, E), n * k // E, dtype=torch.int64)
    source_counts[0, :, 0] += int(skew * n)
    source_counts[0, :, 1:] -= int(skew * n) // 7
    source_counts[1, :, 5] += int(skew * n)
    source_counts[1, :, [0, 1, 2, 3, 4, 6, 7]] -= int(skew * n) // 7
    counts = source_counts.sum(0)
    stats = RoutingStats(method="pesc", num_experts=E, top_k=k, routing="topk_softmax", normalize_topk=True,
                         layers=[0, 1], sources=["math", "code"], tokens=int(counts[0].sum()) // k,
                         source_tokens=[int(source_counts[0, 0].sum()) // k, int(source_counts[1, 0].sum()) // k],
                         source_records=[20, 20], counts=counts, gate_sums=counts.double() * 0.5,
                         entropy_sums=torch.full((L,), 1.5 * n), coselection=torch.zeros(L, E, E, dtype=torch.int64),
                         source_counts=source_counts)
    write_routes(stats, run / "routes")


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    root = tmp_path / "runs"
    dirs = [fake_run(root, "dense-s0", "dense", 0, 1.5),
            fake_run(root, "upcycle-s0", "upcycle", 0, 1.3),
            *[fake_run(root, f"pesc-s{s}", "pesc", s, final) for s, final in zip((0, 1, 2), (1.0, 1.2, 1.4))]]
    eval_dir = dirs[2] / "eval"
    eval_dir.mkdir()
    (eval_dir / "results.json").write_text(json.dumps({
        "tasks": {"gsm8k": {"exact_match,none": 0.25, "exact_match_stderr,none": 0.01, "exact_match/flexible": 0.3},
                  "humaneval": {"pass@1": 0.125}},
        "primary_metric": {"gsm8k": "exact_match,none"}}))
    (eval_dir / "quick.json").write_text(json.dumps({"loss": 1.05, "sources": {
        "math": {"loss": 1.0, "perplexity": 2.718}, "code": {"loss": 1.1, "perplexity": 3.004}}}))
    fake_routes(dirs[2], 0.3)
    return dirs


def test_report_names_every_run_and_groups_seeds(runs, tmp_path):
    out = tmp_path / "report"
    paths = write_report(runs, out, title="PESC vs baselines")
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for run in runs:
        assert run.name in md and run.name in page
    assert md.startswith("# PESC vs baselines") and "<title>PESC vs baselines</title>" in page
    # three seeds of pesc: mean ± sample std of 1.0, 1.2, 1.4 is 1.2 ± 0.2
    pesc_row = next(line for line in md.splitlines() if line.startswith("| pesc | 3 (0, 1, 2)"))
    assert "1.2000 ± 0.2000" in pesc_row and "1,100 ± 100" in pesc_row  # train loss; tokens/s 1000..1200
    assert "| 1.5M | 135M |" in pesc_row  # equal over seeds: no ± 0
    dense_row = next(line for line in md.splitlines() if line.startswith("| dense | 1 (0)"))
    assert "1.5000" in dense_row and "±" not in dense_row and "1.5 GiB" in dense_row
    # methods in the paper's order: dense, upcycle, pesc
    assert md.index("| dense | 1") < md.index("| upcycle | 1") < md.index("| pesc | 3")
    # per-source held-out loss with the group's mean, benchmarks without stderr, quick-eval perplexity
    per_source = md.split("## Held-out loss per source")[1]
    assert "| run | method | code | math |" in per_source
    assert "| **pesc** (mean ± std) | pesc | 1.4000 ± 0.2000 | 1.2000 ± 0.2000 |" in per_source
    assert "gsm8k/exact_match" in md and "humaneval/pass@1" in md and "stderr" not in md
    assert "flexible" not in md  # only the task's primary metric when results.json names one
    assert "2.718" in md
    # every image the Markdown links exists, is a real plot, and is inlined in the HTML (self-contained)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert {"loss_curves.png", "router_curves.png", "routes_pesc-s0_load.png",
            "routes_pesc-s0_sources.png"} <= set(images)
    for name in images:
        assert_valid_png(out / name)
        assert (out / name).with_suffix(".csv").is_file()
    assert page.count("data:image/png;base64,") == len(images)
    assert not re.search(r"src=\"(?!data:)", page)
    assert json.loads(paths["json"].read_text())["groups"][2]["runs"] == ["pesc-s0", "pesc-s1", "pesc-s2"]


def test_loss_curve_numbers_match_the_logs(runs, tmp_path):
    out = tmp_path / "report"
    write_report(runs, out)
    rows = (out / "loss_curves.csv").read_text().splitlines()
    assert rows[0] == "run,split,step,loss"
    logged = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if "loss" in r]
    ours = [row.split(",") for row in rows[1:] if row.startswith("dense-s0,train,")]
    assert [(int(s), float(v)) for _, _, s, v in ours] == [(r["step"], r["loss"]) for r in train]
    router = (out / "router_curves.csv").read_text()
    assert "dense-s0" not in router and "pesc-s1,load_imbalance,30," in router  # dense has no router


def test_missing_and_broken_files_are_handled(tmp_path):
    root = tmp_path / "runs"
    only_metrics = fake_run(root, "killed", "pesc", 0, 1.1, summary=False, recipe_file=False)
    old = fake_run(root, "old-summary", "dense", 0, 1.6, metrics=False)
    summary = json.loads((old / "summary.json").read_text())
    del summary["peak_mem_bytes"], summary["total_params"]
    (old / "summary.json").write_text(json.dumps(summary))
    broken = fake_run(root, "broken", "upcycle", 3, 1.3)
    (broken / "summary.json").write_text("{not json")
    with open(broken / "metrics.jsonl", "a") as f:
        f.write('{"step": 31, "loss": 0.')  # a line cut by a kill
    out = tmp_path / "report"
    write_report([only_metrics, old, broken], out)
    md = (out / "report.md").read_text()
    assert all(name in md for name in ("killed", "old-summary", "broken"))
    assert "no summary.json" in md and "summary.json has no peak_mem_bytes" in md and "summary.json unreadable" in md
    run = load_run(only_metrics)
    assert run.method == "unknown" and run.value("final_loss") == pytest.approx(run.metrics[-2]["loss"])
    assert run.value("eval_loss") == pytest.approx(run.metrics[-1]["eval_loss"])
    assert load_run(broken).method == "upcycle"  # from its recipe when the summary is unreadable
    old_row = next(line for line in md.splitlines() if line.startswith("| old-summary |"))
    assert "| – |" in old_row  # no peak memory / total parameters: a dash, not an error
    assert "No run has a loss" not in md and (out / "loss_curves.png").is_file()


def test_further_evaluation_folders_are_read_beside_eval(runs, tmp_path):
    extra = runs[2] / "eval-independent"
    extra.mkdir()
    (extra / "results.json").write_text(json.dumps({
        "tasks": {"sc_indep_qa": {"match": 0.5, "exact_match": 0.25}, "gsm8k": {"exact_match,none": 0.9}},
        "primary_metric": {"sc_indep_qa": "match"}, "not_run": {"sc_indep_code": "refused"}}))
    (extra / "quick.json").write_text(json.dumps({"sources": {
        "indep-math": {"loss": 1.5, "perplexity": 4.4817}, "math": {"loss": 2.0, "perplexity": 7.389}}}))
    run = load_run(runs[2])
    assert run.benchmarks["sc_indep_qa/match"] == 0.5 and "sc_indep_qa/exact_match" not in run.benchmarks
    assert run.benchmarks["gsm8k/exact_match"] == 0.25  # eval/ comes first
    assert run.not_run == {"sc_indep_code": "refused"}
    assert set(run.quick["sources"]) == {"math", "code", "indep-math", "independent:math"}
    write_report([runs[2]], tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "indep-math" in md and "4.482" in md and "sc_indep_qa/match" in md


def test_bad_run_directories_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a training run"):
        load_runs([tmp_path / "empty"])
    run = fake_run(tmp_path, "r", "pesc", 0, 1.0)
    with pytest.raises(ConfigError, match="given twice"):
        load_runs([run, tmp_path / "r"])


def test_groups_tell_settings_apart_and_parent_dir_expands(tmp_path):
    root = tmp_path / "runs"
    for s in (0, 1):
        fake_run(root, f"e4-s{s}", "pesc", s, 1.0 + s, craft={"num_experts": 4})
        fake_run(root, f"e8-s{s}", "pesc", s, 1.1 + s)
    runs = load_runs([root])  # the parent directory stands for its runs
    assert [r.name for r in runs] == ["e4-s0", "e4-s1", "e8-s0", "e8-s1"]
    groups = group_runs(runs)
    # labelled by the runs' names without the seed, which tell them apart
    assert sorted(g.label for g in groups) == ["pesc (e4)", "pesc (e8)"]
    assert all(len(g.runs) == 2 for g in groups)


def test_groups_whose_names_do_not_tell_them_apart_are_labelled_by_settings(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "run-s0", "pesc", 0, 1.0, craft={"num_experts": 4})
    fake_run(root, "run-s1", "pesc", 1, 1.1)
    labels = sorted(g.label for g in group_runs(load_runs([root])))
    assert labels == ["pesc (craft.num_experts=4)", "pesc (craft.num_experts=8)"]


def test_group_labels_shorten_long_paths(tmp_path):
    root = tmp_path / "runs"
    for seed, name in enumerate(("argmin", "balanced")):  # one name ("exp"), so the settings label them
        run = fake_run(root, f"exp-s{seed}", "pesc", 0, 1.0)
        data = json.loads((run / "recipe.json").read_text())
        data["upit"] = {"experts": f"/home/someone/work/runs/ablation/{name}/expand"}
        (run / "recipe.json").write_text(json.dumps(data))
    labels = sorted(g.label for g in group_runs(load_runs([root])))
    assert labels == ["pesc (upit.experts=…/argmin/expand)", "pesc (upit.experts=…/balanced/expand)"]


def fake_upit_pipeline(root: Path, name: str, seed: int, final: float, expand: bool = True) -> Path:
    """An UpIT pipeline folder as `sparsecraft upit` leaves it: upit.json, its own summary, upcycle/ (a run
    whose recipe points at this pipeline's experts and router)."""
    pipeline = root / name
    run = fake_run(pipeline, "upcycle", "pesc", seed, final)
    data = json.loads((run / "recipe.json").read_text())
    data["upit"] = {"experts": str(pipeline / "expand"), "router": str(pipeline / "route" / "router.safetensors")}
    (run / "recipe.json").write_text(json.dumps(data))
    (pipeline / "upit.json").write_text(json.dumps({
        "kind": "lora", "output_dir": str(pipeline), "train": {"seed": seed},
        "expand": {"enabled": expand, "seed": seed, "p": 0.5}, "route": {"seed": seed, "seed_min": 40}}))
    (pipeline / "summary.json").write_text(json.dumps({"prepare": {}, "upcycle": {}}))
    return pipeline


def test_upit_pipelines_group_by_their_config_not_their_paths(tmp_path):
    root = tmp_path / "runs"
    for s in (0, 1):
        fake_upit_pipeline(root, f"upit-s{s}", s, 1.2 + s / 10)
    fake_upit_pipeline(root, "upit-noexpand-s0", 0, 1.3, expand=False)
    runs = load_runs([root])  # a pipeline folder stands for its post-training run
    assert [r.path.relative_to(root).as_posix() for r in runs] == [
        "upit-noexpand-s0/upcycle", "upit-s0/upcycle", "upit-s1/upcycle"]
    assert [r.name for r in runs] == ["upit-noexpand-s0", "upit-s0", "upit-s1"]  # named by their pipelines
    assert runs[1].pipeline["expand"]["enabled"] is True
    # seeds of one pipeline config together although their expert/router paths differ; expansion apart
    groups = {g.label: [r.seed for r in g.runs] for g in group_runs(runs)}
    assert groups == {"pesc (upit-noexpand)": [0], "pesc (upit)": [0, 1]}
    runs[0].name = "upit-s2"  # the same name as the others: the pipeline setting that differs labels them
    groups = {g.label: [r.seed for r in g.runs] for g in group_runs(runs)}
    assert groups == {"pesc (pipeline.expand.enabled=False)": [0], "pesc (pipeline.expand.enabled=True)": [0, 1]}
    assert [r.path.name for r in load_runs([root / "upit-s1"])] == ["upcycle"]


def test_same_directory_names_stay_apart(tmp_path):
    a = fake_run(tmp_path / "exp1", "pesc", "pesc", 0, 1.0)
    b = fake_run(tmp_path / "exp2", "pesc", "pesc", 1, 1.2)
    assert [r.name for r in load_runs([a, b])] == ["exp1/pesc", "exp2/pesc"]


def test_loss_curves_without_losses_write_nothing(tmp_path):
    assert plot_loss_curves({"a": [{"step": 1, "lr": 1.0}]}, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()


@pytest.fixture
def main(monkeypatch):
    """`sparsecraft` with the compare command, registered or not in cli/__init__.py yet."""
    monkeypatch.setitem(cli.COMMANDS, "compare", compare_cmd)
    return cli.main


def test_cli_compare(main, runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["compare", *map(str, runs), "--out", str(out), "--title", "Three methods"]) == 0
    assert "report.md" in capsys.readouterr().out
    assert "# Three methods" in (out / "report.md").read_text()
    assert (out / "report.html").is_file()


def test_cli_compare_bad_input_exits_2(main, tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main(["compare", str(tmp_path / "plain"), "--out", str(tmp_path / "o")]) == 2
    assert "not a training run" in capsys.readouterr().err


def test_real_tiny_runs_routes_and_report(main, monkeypatch, tmp_path, capsys):
    """Three real training runs (pesc, mixlora, dense) of a tiny LLaMA, `routes` over the recipe's held-out sources,
    then one report holding them all, with the routing of the two MoE runs."""

    from conftest import save_tiny_base

    from sparsecraft.cli import routes as routes_cmd
    from sparsecraft.train.loop import run as train
    from sparsecraft.train.recipe import load_recipe

    monkeypatch.setitem(cli.COMMANDS, "routes", routes_cmd)
    save_tiny_base(tmp_path / "base")
    for name, make in (("math", lambda i: (f"{i % 7}+{i % 5}?", f"{i % 7 + i % 5}")),
                       ("code", lambda i: (f"def f{i}():", f"return {i}"))):
        for split, n in (("train", 24), ("heldout", 8)):
            with open(tmp_path / f"{name}-{split}.jsonl", "w") as f:
                for i in range(n):
                    q, a = make(i + 100 * (split == "heldout"))
                    f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n")
    data = (f"{{sources: [{{path: {tmp_path}/math-train.jsonl, name: math}}, {{path: {tmp_path}/code-train.jsonl, "
            f"name: code}}], eval_sources: [{{path: {tmp_path}/math-heldout.jsonl, name: math}}, "
            f"{{path: {tmp_path}/code-heldout.jsonl, name: code}}], max_length: 32}}")
    runs = {}
    for method in ("pesc", "mixlora", "dense"):
        runs[method] = tmp_path / "runs" / method
        train(load_recipe(None, [f"model={tmp_path / 'base'}", f"output_dir={runs[method]}", f"data={data}",
                                 f"method={method}", "quantization=none", "max_steps=4", "batch_size=4",
                                 "lora.r=4", "craft.num_experts=4", "craft.adapter_dim=8", "logging.progress=false",
                                 "logging.tensorboard=false", "checkpoint.every=0"]))
    # no DATA: the held-out sources of the recipe the model was trained with
    assert main(["routes", str(runs["pesc"] / "model"), "--out", str(runs["pesc"] / "routes"), "--no-progress"]) == 0
    stats = RoutingStats.read(runs["pesc"] / "routes")
    assert sorted(stats.sources) == ["code", "math"] and stats.source_records == [8, 8]
    assert (runs["pesc"] / "routes" / "router_curves.png").is_file()  # from the run's metrics.jsonl
    assert main(["routes", str(runs["mixlora"] / "model"), "--out", str(runs["mixlora"] / "routes"),
                 "--no-progress"]) == 0
    mixlora = RoutingStats.read(runs["mixlora"] / "routes")
    assert mixlora.method == "mixlora" and int(mixlora.counts.sum()) > 0
    assert main(["routes", str(runs["dense"] / "model"), "--out", str(tmp_path / "x")]) == 2
    assert "dense" in capsys.readouterr().err
    out = tmp_path / "report"
    assert main(["compare", *(str(r) for r in runs.values()), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| pesc | 1 (0) |" in md and "| dense | 1 (0) |" in md and "## Routing" in md
    assert "| mixlora | 1 (0) |" in md and "routes_mixlora_load.png" in md and "routes_pesc_load.png" in md
    assert "## Notes" not in md  # a real run has every file the report reads
    for png in ("loss_curves.png", "router_curves.png", "routes_pesc_load.png", "routes_pesc_sources.png"):
        assert_valid_png(out / png)


def test_paper_categories_and_tasks_not_run(tmp_path):
    """Table 2's categories per run (each the mean of its tasks that ran; the average the mean of categories),
    and the tasks a suite could not run listed, never dropped."""
    from sparsecraft.evaluate.suites import PAPER_CATEGORIES, category_scores, parse_tasks

    assert {r.name for r in parse_tasks("paper")} == {t for ts in PAPER_CATEGORIES.values() for t in ts}
    scores = {"sc_humaneval": 0.2, "mbpp": 0.4, "gsm8k": 0.1, "arc_easy": 0.6, "piqa": 0.8}
    cats = category_scores(scores)
    assert cats["Code"] == pytest.approx(0.3) and cats["Math"] == pytest.approx(0.1)
    assert cats["Commonsense"] == pytest.approx(0.7) and cats["Knowledge"] is None and cats["MMLU"] is None
    assert cats["Average"] == pytest.approx((0.3 + 0.1 + 0.7) / 3)

    run = fake_run(tmp_path / "runs", "pesc-s0", "pesc", 0, 1.2)
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps({
        "model": "m", "tasks": {"sc_humaneval": {"pass@1": 0.25}, "gsm8k": {"exact_match,strict-match": 0.5}},
        "primary_metric": {"sc_humaneval": "pass@1", "gsm8k": "exact_match,strict-match"},
        "not_run": {"mmlu": "task 'mmlu' needs its data from the Hugging Face hub"}}))
    write_report([run], tmp_path / "report", "t")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| run | method | Code | Math | Commonsense | Knowledge | MMLU | Average |" in md
    assert "| pesc-s0 | pesc | 0.25 | 0.5 | – | – | – | 0.375 |" in md  # categories that ran: (0.25 + 0.5) / 2
    assert "| pesc-s0 | mmlu |" in md


def test_a_suite_reports_unreachable_tasks_and_runs_the_rest(monkeypatch):
    pytest.importorskip("lm_eval")
    from sparsecraft.evaluate.lm_eval_bridge import prepare_tasks
    from sparsecraft.evaluate.suites import TaskRequest

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prepared = prepare_tasks([TaskRequest("arc_easy", 0, from_suite=True), TaskRequest("sc_math_mc")])
    assert prepared.names == ["sc_math_mc"] and list(prepared.not_run) == ["arc_easy"]
    assert "hub" in prepared.not_run["arc_easy"]


def test_seedless_names():
    from sparsecraft.evaluate.run_groups import seedless_name

    cases = {"camel-s2": "camel", "pesc_seed3": "pesc", "upit-s0/upcycle": "upit/upcycle", "x/s1": "x",
             "ablations1": "ablations1", "s0": "s0", "dense-matched-s1": "dense-matched"}
    assert {name: seedless_name(name) for name in cases} == cases


def test_sampled_pass_at_k_all_shown_and_categories_use_the_headline(tmp_path):
    run = fake_run(tmp_path / "runs", "pesc-s1", "pesc", 1, 1.2)
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps({
        "model": "m",
        "tasks": {"sc_humaneval": {"pass@10/sampled": 0.6, "pass@1/sampled": 0.2, "pass@1_stderr/sampled": 0.01,
                                   "pass@5/sampled": 0.4, "pass@1/other": 0.9},
                  "gsm8k": {"exact_match,strict-match": 0.5, "exact_match,flexible-extract": 0.7}},
        "primary_metric": {"sc_humaneval": "pass@1/sampled", "gsm8k": "exact_match,strict-match"}}))
    write_report([run], tmp_path / "report", "t")
    md = (tmp_path / "report" / "report.md").read_text()
    for key in ("sc_humaneval/pass@1/sampled", "sc_humaneval/pass@5/sampled", "sc_humaneval/pass@10/sampled"):
        assert key in md
    # another filter's pass@1 and a non-primary metric stay out; no standard errors
    assert "pass@1/other" not in md and "flexible-extract" not in md and "stderr" not in md
    # Code is pass@1 (0.2), not whichever pass@k came last: (0.2 + 0.5) / 2
    assert "| pesc-s1 | pesc | 0.2 | 0.5 | – | – | – | 0.35 |" in md
