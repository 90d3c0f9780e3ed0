"""torch.compile of the PESC blocks (`moe/compiled.py`): the compiled math equals the eager blocks in a training
step (forward and every gradient) on the grouped and the masked-dense paths, decodes the same tokens, compiles
once for all layers, and is reachable from a recipe (`train.compile`), generate / serve (`--compile`) and bench
(`pesc:compiled`)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import sparsecraft
from sparsecraft.errors import ConfigError
from sparsecraft.moe.compiled import compile_moe_blocks, compile_note
from sparsecraft.moe.experts import choose_path

IDS = torch.randint(5, 120, (2, 16), generator=torch.Generator().manual_seed(0))


def crafted(num_experts: int, adapter_dim: int):
    model = sparsecraft.craft(tiny_model("llama"), sparsecraft.CraftConfig(
        num_experts=num_experts, top_k=2, adapter_dim=adapter_dim, dropout=0.0), seed=0)
    with torch.no_grad():  # non-zero up-projections: the adapters change the output and get gradients
        for _, mlp in sparsecraft.crafted_layers(model):
            mlp.moe.experts.up.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return model


def step(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    out = model(input_ids=IDS, labels=IDS)
    loss = out.loss + out.aux_loss if getattr(out, "aux_loss", None) is not None else out.loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out.logits.detach(), grads


@pytest.mark.parametrize("experts, rank, path", [(8, 64, "grouped"), (4, 8, "dense")])
def test_compiled_training_step_equals_eager(experts, rank, path):
    assert choose_path(IDS.numel(), experts, 2, rank) == path  # both traced paths are covered
    model = crafted(experts, rank)
    want_logits, want_grads = step(model)
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    assert compile_moe_blocks(model) == len(sparsecraft.crafted_layers(model)) == 3
    got_logits, got_grads = step(model)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert set(got_grads) == set(want_grads) and any(".moe.experts." in n for n in got_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # one compiled function serves every layer (a compile per block would give at least 2 graphs per layer; the
    # grouped path's eager GEMM call splits the block into graphs before and after it), and another step of
    # the same shapes compiles nothing new
    graphs = counters["stats"]["unique_graphs"]
    assert graphs <= 4, dict(counters["stats"])
    step(model)
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_decoding_gives_the_eager_tokens():
    model = crafted(4, 8).eval()
    prompt = IDS[:1, :6]
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=6, do_sample=False)
        compile_moe_blocks(model)
        got = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_compile_note_for_models_without_pesc_blocks():
    assert compile_moe_blocks(tiny_model("llama")) == 0
    assert "runs eager" in compile_note(0) and compile_note(2) is None


def test_bench_compiled_variants():
    from sparsecraft.bench.base import dispatch_label
    from sparsecraft.bench.block import make_block
    from sparsecraft.bench.settings import BenchSettings, parse_variant

    assert parse_variant("pesc:compiled")[0].name == "pesc"
    assert parse_variant("pesc-dense:compiled")[1] == "dense"
    for bad in ("upcycle:compiled", "loop:compiled", "dense:compiled"):
        with pytest.raises(ConfigError, match="only PESC variants can be compiled"):
            parse_variant(bad)
    settings = BenchSettings(shape="tiny", tokens=64, methods=["pesc:compiled"])
    settings.validate()
    ffn = torch.nn.Linear(64, 64)
    block, _ = make_block(settings, "pesc:compiled", ffn, 64, torch.device("cpu"))
    assert block.compiled
    assert dispatch_label(block, "auto", 64, settings, 64, torch.device("cpu")) == "compiled:grouped"


def test_recipe_and_cli_options():
    from sparsecraft.cli import build_parser
    from sparsecraft.train.recipe import load_recipe

    assert load_recipe(None, ["data=x.jsonl", "train.compile=true"]).train.compile is True
    assert load_recipe(None, ["data=x.jsonl"]).train.compile is False
    with pytest.raises(ConfigError, match="train.compile must be bool"):
        load_recipe(None, ["data=x.jsonl", "train.compile=maybe"])
    parser = build_parser()
    assert parser.parse_args(["generate", "m", "--prompt", "hi", "--compile"]).compile
    from sparsecraft.cli.serve import settings_from_args

    assert settings_from_args(parser.parse_args(["serve", "m", "--compile"])).compile
