"""Bad numbers and bad paths are refused before any work, in one line (issue 15: items 1, 6, 7, 8)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

import sparsecraft
from sparsecraft.cli import main
from sparsecraft.errors import ConfigError
from sparsecraft.train.recipe import load_recipe


@pytest.mark.parametrize("override, message", [
    ("lr=.inf", "optim.lr must be a finite number"), ("lr=-1", "optim.lr"), ("lr=.nan", "optim.lr"),
    ("optim.max_grad_norm=.nan", "max_grad_norm"),  # NaN there would silently turn clipping off
    ("optim.eps=0", "optim.eps"), ("optim.weight_decay=.inf", "weight_decay"), ("optim.betas=[0.9, 1.0]", "betas"),
    ("optim.betas=[0.9]", "betas"), ("epochs=.nan", "train.epochs"), ("lora.dropout=1.0", "lora.dropout"),
    ("craft.dropout=.nan", "dropout"), ("checkpoint.every=-1", "checkpoint.every"),
    ("train.eval_every=-2", "eval_every"),
])
def test_numbers_are_finite_and_in_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, ["data=x.jsonl", override])


def test_recipe_number_errors_reach_the_cli_as_one_line(capsys):
    assert main(["train", "configs/quickstart.yaml", "lr=.inf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.lr" in err[0]


def test_generate_caps_new_tokens_at_the_models_context(tmp_path, capsys):
    model = tiny_model("llama")  # max_position_embeddings 128
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    assert main(["generate", str(tmp_path / "m"), "--prompt", "hi", "--max-new-tokens", "100000",
                 "--no-stream"]) == 0
    err = capsys.readouterr().err
    assert "capped from 100000 to" in err and "128-token context" in err
    long_prompt = "x" * 200  # a character tokenizer: 200 tokens
    assert main(["generate", str(tmp_path / "m"), "--prompt", long_prompt, "--no-chat-template"]) == 2
    assert "context is 128" in capsys.readouterr().err


def test_output_paths_are_checked_before_the_work(tmp_path, capsys):
    model = sparsecraft.craft(tiny_model(), sparsecraft.CraftConfig(num_experts=4, adapter_dim=8), seed=0)
    sparsecraft.save(model, tmp_path / "pesc", standalone=True, tokenizer=tiny_tokenizer())
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a directory")
    capsys.readouterr()
    for argv in (["export", str(tmp_path / "pesc"), str(a_file)],
                 ["craft", str(tmp_path / "pesc" / "base"), str(a_file)],
                 ["convert", str(tmp_path / "pesc"), str(a_file), "--to", "camelidae"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is a file" in err[0], argv
    assert a_file.read_text() == "not a directory"


def test_report_markdown_shows_html_in_names_as_text():
    from sparsecraft.evaluate.report_doc import Section, Table
    from sparsecraft.evaluate.report_markdown import render_markdown

    md = render_markdown([Section("Runs <b>", ["a <script>alert(1)</script> & b",
                                               Table(["run"], [["<img src=x onerror=alert(1)>"]])])])
    assert "<script>" not in md and "<img" not in md and "<b>" not in md
    assert "&lt;script&gt;" in md and "&lt;img src=x onerror=alert(1)&gt;" in md and "&amp; b" in md


def test_no_nan_reaches_the_recipe_through_yaml(tmp_path):
    (tmp_path / "r.yaml").write_text("optim: {lr: .nan}\ndata: {sources: [{path: a.jsonl}]}\n")
    with pytest.raises(ConfigError, match="optim.lr"):
        load_recipe(tmp_path / "r.yaml")


def test_paged_optimizers_need_a_gpu():
    from types import SimpleNamespace

    from sparsecraft.train.optim import make_optimizer

    optim = SimpleNamespace(name="paged_adamw_8bit", lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0)
    with pytest.raises(ConfigError, match="needs a GPU"):
        make_optimizer(optim, [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu"))
    optim.name = "adamw"
    assert isinstance(make_optimizer(optim, [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu")),
                      torch.optim.AdamW)


def test_adamw_is_fused_on_the_cpu_and_steps_as_the_loop_does():
    from types import SimpleNamespace

    from sparsecraft.train.optim import make_optimizer

    optim = SimpleNamespace(name="adamw", lr=1e-2, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in start] for _ in range(3)]
    results = []
    for build in (lambda ps: make_optimizer(optim, ps, torch.device("cpu")),
                  lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.01, foreach=False)):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = build(params)
        for step in grads:
            for p, grad in zip(params, step):
                p.grad = grad.clone()
            opt.step()
        results.append(params)
    assert make_optimizer(optim, [torch.nn.Parameter(torch.zeros(2))], torch.device("cpu")).defaults["fused"]
    for fused, loop in zip(*results):
        torch.testing.assert_close(fused, loop)


def test_bench_json_path_is_checked_before_the_benchmark(tmp_path, capsys):
    assert main(["bench", "--shape", "tiny", "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a directory" in err[0]
