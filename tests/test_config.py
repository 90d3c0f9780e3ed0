"""CraftConfig validation (one-line ConfigError naming the field) and layer selection parsing."""

from __future__ import annotations

import json

import pytest

from sparsecraft.config import CraftConfig, parse_layer_spec
from sparsecraft.errors import ConfigError, SparsecraftError


def test_defaults_are_valid_and_round_trip_through_json():
    cfg = CraftConfig(num_experts=16, top_k=4, adapter_dim=512, scaling=0.25, layers=[0, 2], extra={"a": 1})
    data = json.loads(json.dumps(cfg.to_dict()))
    assert CraftConfig.from_dict(data) == cfg
    assert CraftConfig().top_k <= CraftConfig().num_experts


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown crafting setting.*topk"):
        CraftConfig.from_dict({"topk": 2})


BAD = [
    ({"top_k": 5, "num_experts": 4}, r"top_k \(5\) cannot exceed num_experts \(4\)"),
    ({"num_experts": 0}, "num_experts must be a positive integer, got 0"),
    ({"num_experts": -3}, "num_experts must be a positive integer, got -3"),
    ({"top_k": 0}, "top_k must be a positive integer, got 0"),
    ({"adapter_dim": 0}, "adapter_dim must be a positive integer, got 0"),
    ({"adapter_dim": 2.5}, "adapter_dim must be a positive integer"),
    ({"num_experts": True}, "num_experts must be a positive integer, got True"),
    ({"scaling": 0}, "scaling must be a positive number"),
    ({"scaling": -1.0}, "scaling must be a positive number"),
    ({"scaling": float("nan")}, "scaling must be a positive number"),
    ({"scaling": "1"}, "scaling must be a positive number"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
    ({"aux_loss_coef": -0.01}, "aux_loss_coef must be a non-negative number"),
    ({"z_loss_coef": float("inf")}, "z_loss_coef must be a non-negative number"),
    ({"normalize_topk": "yes"}, "normalize_topk must be true or false"),
    ({"routing": "expert_choice"}, "routing must be one of topk_softmax, softmax_topk; got 'expert_choice'"),
    ({"dispatch": "fast"},
     "dispatch must be one of auto, rule, dense, grouped, padded, sorted, gathered, triton, loop"),
    ({"combine": "sum"}, "combine must be one of residual, per_slot"),
    ({"router_dtype": "bfloat16"}, "router_dtype must be one of float32, model"),
    ({"activation": "swish"}, "activation must be one of"),
    ({"layers": "every:0"}, "'every:N' needs a positive integer N"),
    ({"layers": "every:two"}, "'every:N' needs a positive integer N"),
    ({"layers": "odd"}, "layers must be 'all', 'every:N' or a list"),
    ({"layers": ""}, "layers must be 'all', 'every:N' or a list"),
    ({"layers": []}, "layers must be 'all', 'every:N' or a non-empty list"),
    ({"layers": [0, "1"]}, "layers must be"),
    ({"layers": 3}, "layers must be"),
    ({"layers": [True]}, "layers must be"),
]


@pytest.mark.parametrize("kwargs, message", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_settings_raise_one_line_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        CraftConfig(**kwargs)
    text = str(info.value)
    assert "\n" not in text and text
    assert isinstance(info.value, SparsecraftError) and isinstance(info.value, ValueError)


def test_validate_catches_later_mutation():
    cfg = CraftConfig(num_experts=4, top_k=2)
    cfg.top_k = 8
    with pytest.raises(ConfigError, match="cannot exceed"):
        cfg.validate()


@pytest.mark.parametrize(
    "spec, n, want",
    [
        ("all", 3, [0, 1, 2]),
        ("every:2", 5, [0, 2, 4]),
        ("every:2", 3, [0, 2]),
        ("every:7", 3, [0]),
        ([0, 2], 3, [0, 2]),
        ((2, 0), 3, [0, 2]),
        ([-1], 3, [2]),
        ([-3, 0, 2], 3, [0, 2]),
        ("0, 2", 4, [0, 2]),
        ("-1", 4, [3]),
    ],
)
def test_parse_layer_spec(spec, n, want):
    assert parse_layer_spec(spec, n) == want
    assert parse_layer_spec(spec, None) is None  # syntax-only check


@pytest.mark.parametrize("spec", [[3], [-4], "0,7"])
def test_layer_index_out_of_range(spec):
    with pytest.raises(ConfigError, match="out of range for a model with 3 decoder layers") as info:
        parse_layer_spec(spec, 3)
    assert "\n" not in str(info.value)
