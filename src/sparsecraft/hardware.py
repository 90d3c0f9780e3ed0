"""What the CPU can do natively, for choosing a compute dtype and for benchmark records.

Machines differ: some Intel Xeons have AMX tiles and AVX512-BF16 (bf16 matmuls in hardware, well ahead of fp32),
many AMD EPYCs and older Intels only AVX2 (bf16 is converted to fp32 around every op, slower than fp32 itself).
The flags come from /proc/cpuinfo on Linux; elsewhere nothing is claimed.
"""

from __future__ import annotations

import functools
import platform

import torch

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # the strongest first


def _cpuinfo_field(*names: str) -> str | None:
    """The value of the first /proc/cpuinfo line whose key starts with one of `names` (None off Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(names):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is not available)."""
    return frozenset((_cpuinfo_field("flags", "features") or "").split())


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_bf16(flags: frozenset[str] | None = None) -> str | None:
    """`amx_bf16` or `avx512_bf16` when the CPU computes bf16 in hardware, else None."""
    flags = cpu_flags() if flags is None else flags
    return next((flag for flag in BF16_FLAGS if flag in flags), None)


def cpu_summary() -> dict:
    """The CPU facts a benchmark record carries: PyTorch's vector capability and native bf16 support."""
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16": cpu_bf16(),
            "cpu_flags_bf16": sorted(f for f in cpu_flags() if "bf16" in f or f.startswith("amx"))}
