"""Crafted directories written by the code before the method registry still load, with identical outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sparsecraft

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_crafted"
METHODS = ("pesc", "upcycle", "lora_experts", "dense")


@pytest.mark.parametrize("method", METHODS)
def test_legacy_directory_loads_with_identical_logits(method):
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    model = sparsecraft.load(FIXTURE / method)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    torch.testing.assert_close(logits, expected[f"{method}.logits"], rtol=0, atol=1e-6)


def test_legacy_fixture_is_not_the_dense_model():
    # guards the fixture itself: each method's weights really change the output, so a loader that dropped them
    # (and returned the dense base) would fail the test above
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    dense_base = sparsecraft.load(FIXTURE / "pesc" / "base")
    with torch.no_grad():
        plain = dense_base(expected["input_ids"]).logits
    for method in ("pesc", "lora_experts"):
        assert (expected[f"{method}.logits"] - plain).abs().max() > 1e-3
