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


def test_auto_precision_takes_bf16_on_cpus_with_bf16_hardware_only(monkeypatch):
    """`precision: auto` computes the base in bf16 on CPUs with AMX-BF16 or AVX512-BF16 (measured faster on
    both), fp32 on other CPUs; explicit settings win everywhere."""
    from sparsecraft.train import setup

    cpu = torch.device("cpu")
    for flag, expected in (("amx_bf16", torch.bfloat16), ("avx512_bf16", torch.bfloat16), (None, torch.float32)):
        monkeypatch.setattr(setup, "cpu_bf16", lambda flag=flag: flag)
        assert setup.compute_dtype_for("auto", cpu) == expected, flag
        assert setup.compute_dtype_for("fp32", cpu) == torch.float32
        assert setup.compute_dtype_for("bf16", cpu) == torch.bfloat16
