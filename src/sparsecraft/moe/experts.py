"""The ways to compute routed bottleneck-adapter experts (stored stacked, `adapter_weights.AdapterExperts`).

Expert e maps the shared FFN output `F` to `s * W_up[e] @ act(W_down[e] @ F)`. All paths below compute

    delta[n] = s * sum_j gates[n, j] * W_up[idx[n, j]] @ act(W_down[idx[n, j]] @ x[n])

for `x: [N, h]`, `gates, idx: [N, k]`, `W_down: [E, r, h]`, `W_up: [E, h, r]`:

- `loop`: a per-expert Python loop with boolean masks, as the published code does (the reference).
- `dense`: every expert for every token as two wide matmuls (`[h, E*r]` then `[E*r, h]`) with the gate as a
  per-token mask in between (in training one Function, `masked_dense.py`). No gather/scatter; wasteful once
  `E/k` or `E*r` is large.
- `grouped`: (token, slot) pairs sorted by expert, one `torch._grouped_mm` per projection; k/E of the dense
  FLOPs. Falls back to `sorted` where `_grouped_mm` is unavailable for the device/dtype.
- `padded`: each expert's pairs in a block of C rows (the busiest expert's count, rounded up to 16), both
  projections and their gradients one `torch.bmm` each (`padded.py`); C*E rows instead of N*k. Only on request.
- `sorted`: the same sorted layout with a per-expert loop over contiguous slices (fallback only).

`dispatch(path="auto")` times the candidate paths once per call shape and keeps the fastest (`moe/probe.py`);
`path="rule"` uses `choose_path`, a fixed rule by shape, instead (no timing: reproducible path choices).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import ACTIVATIONS, activation_fn
from .adapter_weights import AdapterExperts  # noqa: F401  (importable from here as before the move)
from .grouped import cuda_grouped_mm_runs, grouped_adapters
from .masked_dense import gate_mask, masked_dense_adapters
from .padded import padded_adapters, padded_rows, padding_pays
from .probe import PROBE, ROUTINGS, token_bucket
from .stacked import cached_stacked_up, stack_up
from .triton_adapters import triton_adapters, triton_available


def autocast_off(t: torch.Tensor):
    """A context that turns autocast off on `t`'s device where it is on. The routed-expert kernels compute in
    the dtype chosen for them (`expert_compute_dtype`); under autocast `torch._grouped_mm` may come back in
    another dtype than its inputs, and a custom backward (which runs without autocast) would then mix them."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


def expert_compute_dtype(activations: torch.Tensor, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype routed experts compute in: their weights' own, except on CUDA with bf16/fp16 activations, where
    fp32 expert weights are cast (differentiably) to the activations' dtype, as autocast would, so the grouped
    GEMM (bf16-only on CUDA) and tensor cores run them."""
    if activations.device.type == "cuda" and activations.dtype in (torch.bfloat16, torch.float16):
        return activations.dtype
    return weight_dtype


def choose_path(num_tokens: int, num_experts: int, top_k: int, adapter_dim: int) -> str:
    """Pick `dense` or `grouped` for a call of this shape.

    The dense path does E/k times the adapter FLOPs but no gather, sort or scatter; it wins when that waste is
    small (few experts per slot), when the stacked width E*r is small enough that one wide matmul is cheap, or
    when there are too few tokens per expert for grouping to pay (decoding). Thresholds measured on the CPU
    (docs/benchmarks.md): at h=576, 1024 tokens, E*r=128 dense is 6% faster, E*r=512 grouped is 8% faster.
    """
    if num_tokens * top_k < num_experts:
        return "gathered"  # decoding one or two tokens: read only the chosen experts' weights
    if num_experts <= 2 * top_k:
        return "dense"
    if num_experts * adapter_dim <= 256:
        return "dense"
    if num_tokens * top_k < 4 * num_experts:
        return "dense"
    return "grouped"


def path_by_shape(dispatch: str, num_tokens: int, num_experts: int, top_k: int, adapter_dim: int) -> str:
    """The named path a `dispatch` setting stands for without timing: the shape rule's pick for `auto` and
    `rule`, the setting itself when it names a path."""
    if dispatch in ("auto", "rule"):
        return choose_path(num_tokens, num_experts, top_k, adapter_dim)
    return dispatch


def candidate_paths(x: torch.Tensor, num_tokens: int, num_experts: int, top_k: int, adapter_dim: int,
                    activation: str = "gelu") -> list[str]:
    """The paths worth timing for a call of this shape (`loop` never wins; `sorted` only stands in for
    `grouped` where `torch._grouped_mm` cannot run; `triton` joins on CUDA with Triton installed). `padded` is
    not timed: alone it ties with `grouped`, but in a model its block size follows the busiest expert of each
    layer, which varies more across 30 layers than one layer's routings show, and it never won a training step
    (SmolLM2, bf16, E=32: 1.39x dense where `grouped` took 1.26x; docs/benchmarks.md)."""
    pairs = num_tokens * top_k
    grouped = "grouped" if grouped_mm_available(x, pairs, adapter_dim) else "sorted"
    kernel = ["triton"] if x.device.type == "cuda" and triton_available(x, activation) else []
    if pairs < num_experts:
        return ["gathered", "dense"]
    if pairs <= 2 * num_experts:
        return ["gathered", "dense", grouped, *kernel]
    return ["dense", grouped, *kernel]


def _probe_key(num_tokens: int, num_experts: int, top_k: int, adapter_dim: int, hidden: int, dtype: torch.dtype,
               device: torch.device | str, training: bool, activation: str) -> tuple:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # a tensor's device is always indexed (`cuda:0`)
        device = torch.device("cuda", torch.cuda.current_device())
    return (token_bucket(num_tokens), num_experts, top_k, adapter_dim, hidden, str(dtype).removeprefix("torch."),
            str(device), training, activation)


def probed_path(x: torch.Tensor, indices: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                activation: str = "gelu") -> str:
    """The measured-fastest path for this call's shape (probing on first use; see `moe/probe.py`).

    Shapes as in `dispatch`; `down`/`up` may still be in their storage dtype (the call computes in `x.dtype`).
    """
    num_tokens, top_k = indices.shape
    num_experts, adapter_dim, hidden = down.shape
    if num_tokens == 0 or torch.compiler.is_compiling():
        return choose_path(num_tokens, num_experts, top_k, adapter_dim)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (x, down, up))
    key = _probe_key(num_tokens, num_experts, top_k, adapter_dim, hidden, x.dtype, x.device, training, activation)
    known = PROBE.cached(key)  # every call after the first of its shape ends here
    if known is not None:
        return known
    candidates = candidate_paths(x, num_tokens, num_experts, top_k, adapter_dim, activation)
    inputs: list[tuple] = []
    inference = torch.is_inference_mode_enabled()  # per thread: the probe's thread takes the caller's
    routing = indices.detach().clone()  # copied here, in the caller's thread (and CUDA stream)
    calls: dict[str, int] = {}

    def run(path: str) -> None:
        if not inputs:  # built once per probe, from private generators (the global RNG is not touched)
            inputs.append(_synthetic_call(num_tokens, num_experts, top_k, adapter_dim, hidden, x.dtype, x.device,
                                          training))
            # the call's own expert choices (a real router's are uneven: at a fresh craft of SmolLM2 the busiest
            # expert takes 2-4x its share), an eighth of them drawn again in each of ROUTINGS routings, as in training
            redraw = torch.Generator().manual_seed(1)
            inputs.append([redraw_some_tokens(routing, num_experts, redraw) for _ in range(ROUTINGS)])
        (xs, gates, _, d, u), routings = inputs
        calls[path] = calls.get(path, -1) + 1  # each path goes through the same routings, in the same order
        idx = routings[calls[path] % ROUTINGS]  # warmed on all of them, then timed on them again
        with autocast_off(xs), torch.set_grad_enabled(training), torch.inference_mode(inference):
            out = _PATHS[path](xs, gates, idx, d, u, activation_fn(activation))
            if training:
                torch.autograd.grad(out.float().sum(), (xs, d, u))

    return PROBE.choose(key, candidates, run, x.device)


def _synthetic_call(n: int, e: int, k: int, r: int, h: int, dtype: torch.dtype, device: torch.device,
                    training: bool) -> tuple:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=gen).to(device, dtype).requires_grad_(training)
    scores, idx = torch.randn(n, e, generator=gen).topk(k, dim=-1)
    gates = scores.softmax(-1).to(device, dtype)
    d = (torch.randn(e, r, h, generator=gen) * 0.02).to(device, dtype).requires_grad_(training)
    u = (torch.randn(e, h, r, generator=gen) * 0.02).to(device, dtype)
    # parameters, as the real call's are: without a gradient the dense path then times its cached `up` layout
    u = nn.Parameter(u, requires_grad=training)
    return x, gates, idx.to(device), d, u


def redraw_some_tokens(indices: torch.Tensor, num_experts: int, gen: torch.Generator,
                       share: float = 0.125) -> torch.Tensor:
    """`indices [N, k]` with the choices of a random `share` of the tokens drawn again (distinct per token).

    Each expert's pair count then differs from call to call, as a real router's does from batch to batch, and
    with it the group sizes of the paths that sort by expert (in bf16 on the CPU whole tiles, for which oneDNN
    builds its kernels once; the probe warms every path on all its routings before timing them).
    """
    num_tokens, top_k = indices.shape
    count = max(1, int(num_tokens * share)) if num_tokens else 0
    rows = torch.randperm(num_tokens, generator=gen)[:count]
    fresh = torch.rand(count, num_experts, generator=gen).topk(top_k, dim=-1).indices
    out = indices.clone()
    out[rows.to(out.device)] = fresh.to(out.device)
    return out


def probed_choice(num_tokens: int, num_experts: int, top_k: int, adapter_dim: int, hidden: int,
                  dtype: torch.dtype, device: torch.device | str, training: bool,
                  activation: str = "gelu") -> str | None:
    """What a probe chose for this shape so far in this process (None when none has run)."""
    return PROBE.cached(_probe_key(num_tokens, num_experts, top_k, adapter_dim, hidden, dtype, device, training,
                                   activation))


def dispatch(
    x: torch.Tensor,
    gates: torch.Tensor,
    indices: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    activation: str = "gelu",
    scaling: float = 1.0,
    path: str = "auto",
) -> torch.Tensor:
    """Weighted sum of the routed adapters' outputs. `path`: `auto` (measured per shape), `rule` (by shape,
    no timing) or one of the paths by name.

    Args:
        x: adapter input `[N, h]` (the FFN output after dropout).
        gates: `[N, k]` gate values; cast to `x.dtype`.
        indices: `[N, k]` expert indices (int64).
        down: `[E, r, h]`; up: `[E, h, r]`.

    Returns:
        `[N, h]` in `x.dtype`: `s * sum_j gates[:, j] * A_{indices[:, j]}(x)`.
    """
    num_experts, adapter_dim = down.shape[0], down.shape[1]
    if path == "auto":
        path = probed_path(x, indices, down, up, activation)
    elif path == "rule":
        path = choose_path(x.shape[0], num_experts, indices.shape[1], adapter_dim)
    if torch.compiler.is_compiling():
        path = traceable_path(path)
    fn = _PATHS.get(path)
    if fn is None:
        raise ValueError(f"unknown dispatch path {path!r}; choose from {', '.join(_PATHS)}")
    # s is folded into the [N, k] gates instead of scaling the [N, h] result (equal up to rounding; one pass less)
    if scaling != 1.0:
        gates = gates * scaling
    with autocast_off(x):
        return fn(x, gates.to(x.dtype), indices, down.to(x.dtype), up.to(x.dtype), activation_fn(activation))


def traceable_path(path: str) -> str:
    """The path to trace under torch.compile: `gathered`, `sorted` and `padded` read routing decisions into
    Python (`.tolist()`, the block size: a graph break per call), so the masked-dense path stands in for them;
    `grouped` stays (its grouped GEMM runs outside the graph where the compiler cannot trace it, see `_grouped`)."""
    return "dense" if path in ("gathered", "sorted", "padded") else path


# `torch._grouped_mm`'s compiler (meta) rules accept bf16 only, while its CPU kernel also runs fp32 / fp16: traced
# in those dtypes it runs as an opaque eager call (one graph break) inside an otherwise compiled block.
_grouped_eager = torch.compiler.disable(grouped_adapters)


def _loop(x, gates, indices, down, up, act):
    out = torch.zeros_like(x)
    for e, (w_down, w_up) in enumerate(zip(down.unbind(0), up.unbind(0))):
        token, slot = torch.where(indices == e)
        if token.numel() == 0:
            continue
        h = act(F.linear(x.index_select(0, token), w_down))
        y = F.linear(h, w_up) * gates[token, slot].unsqueeze(-1)
        out = out.index_add(0, token, y)
    return out


def _dense(x, gates, indices, down, up, act):
    if (x.shape[0] >= _DENSE_BMM_TOKENS and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(t.requires_grad for t in (x, gates, down, up))):
        # saves 1 of the 3 [N, E*r] tensors; fewer tokens keep the composite, whose bmm skips the copy of `up`
        return masked_dense_adapters(x, gates, indices, down, up, act)
    return masked_dense_composite(x, gates, indices, down, up, act)


def masked_dense_composite(x: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, down: torch.Tensor,
                           up: torch.Tensor, act) -> torch.Tensor:
    """The masked-dense path from torch ops (inference, few tokens, tracing): `[N, h]` -> `[N, h]`."""
    num_tokens = x.shape[0]
    num_experts, adapter_dim, hidden = down.shape
    mask = gate_mask(indices, gates, num_experts)  # [N, E]
    h = act(F.linear(x, down.reshape(num_experts * adapter_dim, hidden)))
    h = h.view(num_tokens, num_experts, adapter_dim) * mask.unsqueeze(-1)
    stacked = cached_stacked_up(up)  # inference: `up` laid out [E*r, h] once, not per call
    if stacked is None and num_tokens < _DENSE_BMM_TOKENS:
        # few tokens with a gradient (or no cache): one batched matmul per expert on `up` as stored, no copy
        return torch.bmm(h.transpose(0, 1), up.transpose(1, 2)).sum(0)
    h = h.view(num_tokens, num_experts * adapter_dim)  # explicit width: also valid for zero tokens
    return h @ (stack_up(up) if stacked is None else stacked)


# Below this many tokens, without a cached stacked `up`, the dense path skips re-laying-out `up` (257 us vs 55 us
# per call at SmolLM2 shapes).
_DENSE_BMM_TOKENS = 64


def _gathered(x, gates, indices, down, up, act):
    """Each (token, slot) pair through its own expert's weights, read in place (no weight copies).

    For decoding one or two tokens, which is memory-bound: it reads k/E of the adapter weights instead of all,
    and its few matrix-vector products cost less than sorting or masking. Python iterates over the N*k pairs
    (at most E-1 of them, see `choose_path`), not over experts.
    """
    out = []
    for row, experts, row_gates in zip(x.unbind(0), indices.tolist(), gates.unbind(0)):
        acc = None
        for slot, e in enumerate(experts):
            y = F.linear(act(F.linear(row, down[e])), up[e]) * row_gates[slot]
            acc = y if acc is None else acc + y
        out.append(acc)
    return torch.stack(out) if out else x.new_zeros(x.shape)


def sort_by_expert(indices: torch.Tensor, gates: torch.Tensor, num_experts: int):
    """Sorted (token, slot) layout: token index, gate and per-expert counts, grouped by expert."""
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = torch.div(order, indices.shape[1], rounding_mode="floor")
    gate = gates.reshape(-1).index_select(0, order)
    counts = torch.bincount(flat, minlength=num_experts)
    return token, gate, counts


class ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (`_grouped_mm` backward needs it)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_available(x: torch.Tensor, num_rows: int, adapter_dim: int) -> bool:
    """Whether `torch._grouped_mm` can run both projections for these shapes on this device.

    Its kernels need row strides that are multiples of 16 bytes (so `h` and `r` times the element size), a
    float32/bfloat16/float16 dtype on the CPU, and at least one row (it reduces over the offsets).
    """
    if not hasattr(torch, "_grouped_mm") or num_rows == 0:
        return False
    if x.dtype not in _GROUPED_MM_DTYPES:
        return False
    itemsize = x.element_size()
    if (x.shape[-1] * itemsize) % 16 or (adapter_dim * itemsize) % 16:
        return False
    if x.device.type == "cuda":
        return cuda_grouped_mm_runs(x)
    return x.device.type == "cpu"


def _grouped(x, gates, indices, down, up, act):
    if not grouped_mm_available(x, indices.numel(), down.shape[1]):
        return _sorted(x, gates, indices, down, up, act)
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return _grouped_eager(x, gates, indices, down, up, act)
    return grouped_adapters(x, gates, indices, down, up, act)


def _padded(x, gates, indices, down, up, act):
    """Batched matmuls over per-expert blocks of padded rows (`padded.py`); routing too uneven for the padding
    to pay goes to the grouped kernel."""
    layout = padded_rows(indices, down.shape[0])
    if not padding_pays(layout.capacity, down.shape[0], indices.numel()):
        return _grouped(x, gates, indices, down, up, act)
    return padded_adapters(x, gates, layout, down, up, act)


def _sorted(x, gates, indices, down, up, act):
    token, gate, counts = sort_by_expert(indices, gates, down.shape[0])
    xs = x.index_select(0, token)
    pieces = []
    sizes = counts.tolist()
    for xe, ge, w_down, w_up in zip(
        xs.split(sizes), gate.split(sizes), down.unbind(0), up.unbind(0)
    ):
        h = act(F.linear(xe, w_down)) * ge.unsqueeze(-1)
        pieces.append(F.linear(h, w_up))
    y = torch.cat(pieces, 0)
    return x.new_zeros(x.shape).index_add_(0, token, y)


def _triton(x, gates, indices, down, up, act):
    """The Triton kernel (`triton_adapters.py`) where it can run (exact GELU, CUDA or Triton's interpreter);
    otherwise the grouped path."""
    if act is not ACTIVATIONS["gelu"] or not triton_available(x, "gelu"):
        return _grouped(x, gates, indices, down, up, act)
    if torch.compiler.is_compiling():
        return _triton_eager(x, gates, indices, down, up)
    return triton_adapters(x, gates, indices, down, up)


_triton_eager = torch.compiler.disable(triton_adapters)  # its launch stays outside a compiled graph

_PATHS = {"loop": _loop, "dense": _dense, "grouped": _grouped, "padded": _padded, "sorted": _sorted,
          "gathered": _gathered, "triton": _triton}
