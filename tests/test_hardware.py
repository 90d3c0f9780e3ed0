"""CPU feature detection for the compute dtype and benchmark records."""

from __future__ import annotations

import torch

from sparsecraft.bench.report import machine_info
from sparsecraft.hardware import cpu_bf16, cpu_flags, cpu_summary


def test_native_bf16_is_named_by_the_strongest_flag():
    assert cpu_bf16(frozenset({"avx2", "fma"})) is None  # e.g. an AVX2-only EPYC: bf16 is emulated
    assert cpu_bf16(frozenset({"avx512f", "avx512_bf16"})) == "avx512_bf16"
    assert cpu_bf16(frozenset({"avx512_bf16", "amx_bf16", "amx_tile"})) == "amx_bf16"


def test_this_machine_is_described_consistently():
    summary = cpu_summary()
    assert summary["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert summary["cpu_bf16"] == cpu_bf16(cpu_flags())
    assert set(summary["cpu_flags_bf16"]) <= cpu_flags()
    info = machine_info(torch.device("cpu"))
    assert info["cpu_bf16"] == summary["cpu_bf16"] and info["cpu_capability"] == summary["cpu_capability"]


def test_auto_precision_is_fp32_on_every_cpu_and_explicit_settings_win():
    from sparsecraft.train import setup

    cpu = torch.device("cpu")
    assert setup.compute_dtype_for("auto", cpu) == torch.float32
    assert setup.compute_dtype_for("fp32", cpu) == torch.float32
    assert setup.compute_dtype_for("bf16", cpu) == torch.bfloat16
