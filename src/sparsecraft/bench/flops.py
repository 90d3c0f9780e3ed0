"""FLOP floors: the matmul FLOPs one training step of a variant cannot avoid, so a time ratio can be read
against the arithmetic ratio (`flop_floor_ratio` = FLOPs of the variant / FLOPs of `dense`).

Counting rules (FLOPs = 2 x multiply-adds; only matmuls; norms, activations, softmax, routing bookkeeping and the
optimizer are left out):

- A matmul `[N, a] x [a, b]` costs `N*a*b` multiply-adds forward. In backward it costs `N*a*b` again for the
  input gradient only when its input needs a gradient, and `N*a*b` for the weight gradient only when the weight
  is trainable. Frozen weights therefore cost 2x (forward + input grad), never the usual 3x.

Block level (`N` tokens, hidden `h`, FFN width `i`, E experts, top-k `k`, adapter width `r`; the input needs a
gradient, the FFN is frozen, router and adapters train; `c_ffn` = FFN multiply-adds per token, 3*h*i for a
gated FFN):

    dense   = 2 * N*c_ffn                                  (forward + input grad)
    pesc    = dense + 3 * N*h*E + 3 * k * 2*N*h*r          (router and k adapters: fwd + input + weight grad)
    loop    = pesc
    upcycle = 3 * k * N*c_ffn + 3 * N*h*E                  (k trainable FFN copies + router)
              (2 * k * N*c_ffn + ... when the copies are frozen, as NF4 copies are under --4bit)
    mixlora = dense + 3 * N*h*E + 3 * k * N*c_lora          (c_lora = 3*r*(h+i): a LoRA pair per projection)

In general: the shared FFN (when the method keeps it) + the router + k experts of `Method.expert_macs` each.

Executed FLOPs count what the path that ran multiplies: the masked-dense path (`pesc-dense`, or `auto`/`rule`
when they pick it, or a compiled block that traces it) runs all E adapters (E instead of k above).

Model level (`L` layers, batch `B`, sequence `T`, `N = B*T`, query width `q = heads*head_dim`, key/value width
`v = kv_heads*head_dim`, vocab `V`, LoRA rank `R` on q, k, v, o; every method has the same LoRA):

    per layer:
      attention projections  fwd  N*(h*q + 2*h*v + q*h)     frozen; input grad of all but q,k,v in layer 0
      LoRA (A then B)        fwd  N*R*(in + out) per target  trainable: fwd + weight grad; input grad of B
                                                            always, of A except for q,k,v in layer 0
      attention core         fwd  N*T*q (QK^T and PV, causal half each); backward twice that (dQ,dK,dV,dP)
      FFN / MoE block        the block formulas above
    lm_head                  2 * N*h*V                      frozen (logits for all N positions)

Layer 0's input is the frozen embedding output, which needs no gradient; its q, k and v projections (and their
LoRA A) therefore skip the input-gradient matmul. From its attention on, everything needs one (LoRA trains).
"""

from __future__ import annotations

from dataclasses import dataclass

from .settings import parse_variant


@dataclass(frozen=True)
class MoEDims:
    """Sizes of the block: hidden, FFN multiply-adds per token (`ffn_macs`, 3*h*i gated), E, k, r; and whether
    the experts train (they do, except NF4 FFN copies)."""

    hidden: int
    ffn_macs: int
    experts: int
    top_k: int
    adapter_dim: int
    experts_train: bool = True


@dataclass(frozen=True)
class ModelDims:
    """Sizes of the decoder for the model-level formula."""

    layers: int
    hidden: int
    q_dim: int
    kv_dim: int
    vocab: int
    moe: MoEDims


def ran_path(label: str) -> str:
    """The dispatch path a bench label says ran: `auto:dense` -> `dense`, `grouped->sorted` -> `sorted`."""
    return label.split(":")[-1].split("->")[-1]


def _moe_block_macs(variant: str, n: int, d: MoEDims, path: str | None) -> int:
    """Multiply-adds of one block of a bench variant (`pesc`, `pesc-dense`, `upcycle`, ...) for `n` tokens whose
    input needs a gradient (see the module docstring); `path`: the label of the path that ran (None: the
    floor, k experts per token)."""
    method, _ = parse_variant(variant)
    ffn = n * d.ffn_macs
    if not method.builds_moe:
        return 2 * ffn
    router = 3 * n * d.hidden * d.experts  # fwd + input grad + weight grad (router trains)
    expert = n * method.expert_macs(d.hidden, d.ffn_macs, d.adapter_dim)
    passes = 3 if d.experts_train else 2  # weight grads only for trainable experts
    if not method.shares_ffn:
        return passes * d.top_k * expert + router  # each token through k FFN copies
    runs_all = path is not None and ran_path(path) == "dense" and method.dense_path_runs_all
    experts_run = d.experts if runs_all else d.top_k
    return 2 * ffn + router + passes * experts_run * expert


def block_flops(variant: str, tokens: int, dims: MoEDims, path: str | None = None) -> int:
    """Matmul FLOPs of one forward+backward of the MoE block alone (`path`: as the path of that label runs it;
    None: the floor)."""
    return 2 * _moe_block_macs(variant, tokens, dims, path)


def model_flops(variant: str, batch: int, seq: int, dims: ModelDims, lora_rank: int, path: str | None = None) -> int:
    """Matmul FLOPs of one forward+backward of the whole LoRA-tuned model (see the module docstring)."""
    n, h, q, v, r = batch * seq, dims.hidden, dims.q_dim, dims.kv_dim, lora_rank
    # (in, out, reads the layer input) of the LoRA'd projections q, k, v, o
    targets = [(h, q, True), (h, v, True), (h, v, True), (q, h, False)]
    total = 0
    for layer in range(dims.layers):
        for fin, fout, reads_layer_input in targets:
            igrad = 0 if (layer == 0 and reads_layer_input) else 1
            total += n * fin * fout * (1 + igrad)  # frozen base projection
            total += n * fin * r * (2 + igrad)  # LoRA A: fwd + weight grad (+ input grad)
            total += n * r * fout * 3  # LoRA B: fwd + weight grad + input grad (A trains)
        total += 3 * n * seq * q  # attention core: causal QK^T + PV forward, twice that backward
        total += _moe_block_macs(variant, n, dims.moe, path)
    total += 2 * n * h * dims.vocab  # lm_head
    return 2 * total


def model_dims(model, settings) -> ModelDims:
    """`ModelDims` of a dense transformers model (before crafting): sizes from its config, FFN multiply-adds
    from the linear layers of its first decoder layer's FFN (so fused or non-gated FFNs count right)."""
    from ..surgery import find_decoder_layers, find_ffn, text_config

    cfg = text_config(model)
    _, layers = find_decoder_layers(model)
    h = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    _, ffn = find_ffn(layers[0], h)
    out_emb = model.get_output_embeddings()
    vocab = getattr(out_emb, "out_features", None) or cfg.vocab_size
    return ModelDims(
        layers=len(layers), hidden=h, q_dim=heads * head_dim, kv_dim=kv_heads * head_dim, vocab=vocab,
        moe=MoEDims(h, ffn_macs(ffn), settings.experts, settings.top_k, settings.adapter_dim),
    )


def ffn_macs(ffn) -> int:
    """Multiply-adds per token of an FFN module: the sum of `in * out` over its linear layers."""
    linears = [m for m in ffn.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]
    return sum(m.in_features * m.out_features for m in linears)
