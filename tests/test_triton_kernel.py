"""The Triton kernel of the routed adapters (`moe/triton_adapters.py`), on the CPU: its block table in plain torch,
and the kernel itself run by Triton's interpreter (`TRITON_INTERPRET=1`, in a subprocess so the setting is the
process's own) against the per-expert reference — output and the gradients of x, gates, down and up, with
experts no token chose and row counts that do not fill a block. On CUDA `pytest -m gpu` runs it compiled."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sparsecraft.moe import experts as ex
from sparsecraft.moe.triton_adapters import block_table, triton_available


def test_block_table_covers_each_expert_in_blocks_of_one_expert():
    counts = torch.tensor([5, 0, 70, 32])  # an empty expert, one spanning three blocks of 32, one exactly one
    offs = torch.cumsum(counts, 0).int()
    expert, start, end = block_table(offs, int(counts.sum()), block_m=32)
    used = end > start
    rows = torch.cat([torch.arange(s, t) for s, t in zip(start[used].tolist(), end[used].tolist())])
    assert torch.equal(rows, torch.arange(int(counts.sum())))  # every sorted pair exactly once, in order
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), offs.long()])
    for e, s, t in zip(expert[used].tolist(), start[used].tolist(), end[used].tolist()):
        assert bounds[e] <= s < t <= bounds[e + 1] and t - s <= 32  # inside its own expert's rows
    assert used.sum() == 1 + 3 + 1 and expert.numel() >= used.sum()


def test_triton_path_falls_back_to_grouped_where_the_kernel_cannot_run():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=gen)
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not triton_available(x, "gelu")  # a CPU tensor, no interpreter
    assert not triton_available(x, "silu")  # only the exact GELU is fused
    scores, idx = torch.randn(16, 4, generator=gen).topk(2, -1)
    gates = scores.softmax(-1)
    down, up = torch.randn(4, 8, 32, generator=gen), torch.randn(4, 32, 8, generator=gen)
    torch.testing.assert_close(ex.dispatch(x, gates, idx, down, up, "silu", 1.0, "triton"),
                               ex.dispatch(x, gates, idx, down, up, "silu", 1.0, "grouped"))


_PARITY = textwrap.dedent("""
    import torch
    from sparsecraft.moe import experts as ex
    from sparsecraft.moe.triton_adapters import triton_available

    for n, e, k, r, h, skip in ((40, 4, 2, 24, 48, None), (37, 8, 2, 64, 96, 3), (5, 8, 1, 16, 32, None)):
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(n, h, generator=gen)
        assert triton_available(x, "gelu")
        logits = torch.randn(n, e, generator=gen)
        if skip is not None:
            logits[:, skip] = -1e9  # an expert no token chooses
        scores, idx = logits.topk(k, -1)
        gates = scores.softmax(-1)
        down = torch.randn(e, r, h, generator=gen) * 0.1
        up = torch.randn(e, h, r, generator=gen) * 0.1
        grad = torch.randn(n, h, generator=gen)
        results = []
        for path in ("triton", "loop"):
            xs, gs, ds, us = (t.clone().requires_grad_(True) for t in (x, gates, down, up))
            y = ex.dispatch(xs, gs, idx, ds, us, "gelu", 0.5, path)
            y.backward(grad)
            results.append((y, xs.grad, gs.grad, ds.grad, us.grad))
        for name, got, want in zip(("out", "x", "gates", "down", "up"), *results):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name} at n={n} e={e}")
    print("parity ok")
""")


def test_triton_kernel_matches_the_reference_in_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _PARITY], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parity ok" in proc.stdout
