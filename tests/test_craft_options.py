"""Crafting options come from `CraftConfig`'s fields: one flag per field (but `extra`), help from the field
metadata, choices from config.py's constants, values checked by `CraftConfig.validate` (one line, exit 2)."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
from conftest import tiny_model, tiny_tokenizer

from sparsecraft import config as config_module
from sparsecraft.cli import build_parser, main
from sparsecraft.cli.bench import BENCH_CRAFT_FIELDS, settings_from_args
from sparsecraft.cli.options import add_craft_options, craft_config_from_options, option_dest
from sparsecraft.config import CraftConfig, craft_fields

EXPOSED = [f.name for f in dataclasses.fields(CraftConfig) if f.name != "extra"]
CHOICES = {"routing": "ROUTING_ORDERS", "dispatch": "DISPATCH_PATHS", "combine": "COMBINE_FORMS",
           "router_dtype": "ROUTER_DTYPES", "activation": "ACTIVATIONS", "balance": "BALANCE_SCOPES",
           "aux_reduce": "AUX_REDUCTIONS"}


def craft_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t")
    add_craft_options(parser)
    return parser


def options_by_flag(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings and a.dest != "help"}


def test_every_field_but_extra_has_exactly_one_flag():
    fields = list(craft_fields())
    assert [f.name for f in fields] == EXPOSED
    flags = {f.name: f.flag for f in fields}
    assert flags["num_experts"] == "--experts"
    assert all(flags[n] == "--" + n.replace("_", "-") for n in EXPOSED if n != "num_experts")
    actions = options_by_flag(craft_parser())
    assert sorted(actions) == sorted(flags.values())
    for f in fields:
        assert actions[f.flag].default == getattr(CraftConfig(), f.name)


def test_flag_names_kept_and_new_ones_added():
    actions = options_by_flag(craft_parser())
    old = ["--experts", "--top-k", "--adapter-dim", "--scaling", "--dropout", "--activation", "--routing",
           "--router-dtype", "--layers", "--aux-loss-coef", "--z-loss-coef"]
    assert set(old) | {"--normalize-topk", "--combine", "--dispatch", "--balance", "--aux-reduce", "--bias-balance",
                       "--bias-update-rate"} == set(actions)
    assert actions["--normalize-topk"].option_strings == ["--normalize-topk", "--no-normalize-topk"]
    assert isinstance(actions["--normalize-topk"], argparse.BooleanOptionalAction)
    assert actions["--layers"].type is str and actions["--experts"].type is int
    assert actions["--scaling"].type is float


def test_types_and_choices_come_from_the_dataclass_and_constants():
    for f in craft_fields():
        if f.name in CHOICES:
            assert f.choices is getattr(config_module, CHOICES[f.name])
            assert f.type is str
        else:
            assert f.choices is None
    types = {f.name: f.type for f in craft_fields()}
    assert types["normalize_topk"] is bool and types["layers"] is str and types["num_experts"] is int


def test_help_texts_are_the_field_metadata(capsys, monkeypatch):
    metadata = {f.name: f.metadata["help"] for f in dataclasses.fields(CraftConfig) if f.name != "extra"}
    assert all(metadata.values())
    actions = options_by_flag(craft_parser())
    for f in craft_fields():
        assert f.help == metadata[f.name]
        assert actions[f.flag].help.startswith(metadata[f.name])  # BooleanOptionalAction may add the default
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping, so each help text is one piece of the output
    with pytest.raises(SystemExit) as info:
        main(["craft", "--help"])
    assert info.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for f in craft_fields():
        assert " ".join(f.help.split()) in shown, f.name
        if f.choices:
            assert "{" + ",".join(f.choices) + "}" in shown


def test_defaults_give_the_default_config():
    args = build_parser().parse_args(["craft", "base", "out"])
    assert craft_config_from_options(args) == CraftConfig()


def test_every_option_reaches_the_config():
    argv = ["--experts", "6", "--top-k", "3", "--adapter-dim", "16", "--scaling", "0.5", "--activation", "silu",
            "--dropout", "0.2", "--routing", "softmax_topk", "--no-normalize-topk", "--router-dtype", "model",
            "--combine", "per_slot", "--aux-loss-coef", "0.02", "--z-loss-coef", "0.001", "--layers", "0,2",
            "--dispatch", "sorted"]
    cfg = craft_config_from_options(build_parser().parse_args(["craft", "base", "out", *argv]))
    assert cfg == CraftConfig(num_experts=6, top_k=3, adapter_dim=16, scaling=0.5, activation="silu", dropout=0.2,
                              routing="softmax_topk", normalize_topk=False, router_dtype="model",
                              combine="per_slot", aux_loss_coef=0.02, z_loss_coef=0.001, layers="0,2",
                              dispatch="sorted")
    again = craft_config_from_options(craft_parser().parse_args(["--normalize-topk"]))
    assert again.normalize_topk is True


def test_no_normalize_topk_and_combine_reach_the_saved_model(capsys, tmp_path):
    base = tmp_path / "base"
    tiny_model("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    code = main(["craft", str(base), str(tmp_path / "out"), "--experts", "4", "--adapter-dim", "8",
                 "--routing", "softmax_topk", "--no-normalize-topk", "--combine", "per_slot", "--dispatch", "dense"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["craft"]
    assert saved["normalize_topk"] is False and saved["combine"] == "per_slot"
    assert saved["routing"] == "softmax_topk" and saved["dispatch"] == "dense" and saved["num_experts"] == 4


@pytest.mark.parametrize("flag, value, message", [
    ("--combine", "sum", "combine must be one of residual, per_slot; got 'sum'"),
    ("--dispatch", "fast",
     "dispatch must be one of auto, rule, dense, grouped, padded, sorted, gathered, triton, loop; got 'fast'"),
    ("--activation", "tanh", "activation must be one of gelu, gelu_tanh, silu, relu; got 'tanh'"),
    ("--router-dtype", "bf16", "router_dtype must be one of float32, model; got 'bf16'"),
    ("--routing", "random", "routing must be one of topk_softmax, softmax_topk; got 'random'"),
])
def test_bad_choice_is_one_line_exit_2(capsys, tmp_path, flag, value, message):
    # validated before the base is looked at: the base need not exist
    code = main(["craft", str(tmp_path / "no-base"), str(tmp_path / "out"), flag, value])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "out").exists()


def test_only_adds_the_named_fields_and_rejects_others():
    parser = argparse.ArgumentParser()
    only = ("top_k", "num_experts")
    add_craft_options(parser, only=only)
    assert sorted(options_by_flag(parser)) == ["--experts", "--top-k"]
    cfg = craft_config_from_options(parser.parse_args(["--experts", "4", "--top-k", "1"]), only=only)
    assert cfg == CraftConfig(num_experts=4, top_k=1)
    with pytest.raises(ValueError, match="extra"):
        add_craft_options(argparse.ArgumentParser(), only=("extra",))
    assert option_dest(next(f for f in craft_fields() if f.name == "num_experts")) == "experts"


def test_bench_takes_its_craft_flags_from_the_fields():
    parser = build_parser()
    args = parser.parse_args(["bench", "--experts", "4", "--top-k", "1", "--adapter-dim", "16", "--layers", "3"])
    settings = settings_from_args(args)
    assert (settings.experts, settings.top_k, settings.adapter_dim, settings.layers) == (4, 1, 16, 3)
    defaults = settings_from_args(parser.parse_args(["bench"]))
    d = CraftConfig()
    assert (defaults.experts, defaults.top_k, defaults.adapter_dim) == (d.num_experts, d.top_k, d.adapter_dim)
    assert defaults.layers is None  # bench's own --layers (first N decoder layers), not the craft layer spec
    assert BENCH_CRAFT_FIELDS == ("num_experts", "top_k", "adapter_dim")
