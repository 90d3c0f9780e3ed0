"""Model level: the whole LoRA-tuned model, one step = forward + backward + AdamW; and greedy decoding.

Every method gets the same peft LoRA (rank `--lora-rank`, q/k/v/o, the training recipe's alpha and dropout rate,
masks drawn as training draws them (`moe.dropout`), same seed); every other variant crafts every layer with its
method (`Method.craft`: `pesc*` and `loop` add routers and adapters, `upcycle` replaces every FFN by E trainable
copies, `mixlora` adds LoRA experts).
Trainable = LoRA + routers + adapters/experts, as in `sparsecraft train`, and AdamW is made as it makes it (fused).

In one process all variants share the frozen base tensors (embeddings, attention, norms, FFN, `lm_head`): a
variant is a deep copy of the base whose parameters are the base's own objects. So the variants start from
identical weights (which the decode check needs) and the run holds one base, not one per variant.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
import torch.nn as nn

from ..moe.balance import is_balance_bias
from ..moe.compiled import compile_moe_blocks
from ..moe.dropout import use_lane_dropout
from ..surgery import crafted_layers, new_parameters
from ..train.optim import adamw
from .base import Variant, autocast_for, dispatch_label, load_dense_base
from .flops import ModelDims, model_dims, model_flops
from .reference import LoopPescBlock
from .settings import REFERENCE, BenchSettings, is_compiled_variant, parse_variant


def build_model_variants(settings: BenchSettings, methods: list[str], device: torch.device,
                         share_base: bool = True) -> list[Variant]:
    """Build every method's model. `share_base=False` (one method, the memory worker) turns the base itself into
    the variant, so nothing but that variant stays in memory."""
    base = load_dense_base(settings, device)
    dims = model_dims(base, settings)
    if not share_base and len(methods) != 1:
        raise ValueError("share_base=False builds exactly one variant")
    variants = []
    for method in methods:
        model = _shared_copy(base) if share_base else base
        variants.append(_model_variant(method, model, settings, dims, device))
    return variants


def _shared_copy(base: nn.Module) -> nn.Module:
    """A deep copy whose parameters are the base's own (frozen) parameter objects: new modules, shared weights."""
    memo = {id(p): p for p in base.parameters()}
    return copy.deepcopy(base, memo)


def _lora_targets(model: nn.Module) -> list[str]:
    from ..train.recipe import LoraSettings

    present = {name.split(".")[-1] for name, _ in model.named_modules() if ".moe." not in f".{name}."}
    return [t for t in LoraSettings().targets if t in present]


def _model_variant(name: str, model: nn.Module, settings: BenchSettings, dims: ModelDims,
                   device: torch.device) -> Variant:
    from peft import LoraConfig, get_peft_model

    from ..train.recipe import LoraSettings

    tokens = settings.batch_size * settings.seq_len
    method, dispatch = parse_variant(name)
    path, relabel = "-", None
    if method.builds_moe:
        method.craft(model, settings.craft_config(dispatch), seed=settings.seed)
        first = crafted_layers(model)[0][1].moe
        path = dispatch_label(first, dispatch, tokens, settings, dims.hidden, device)
        relabel = lambda: dispatch_label(first, dispatch, tokens, settings, dims.hidden, device)  # noqa: E731
        if is_compiled_variant(name):
            compile_moe_blocks(model)
        if name == REFERENCE:
            for _, mlp in crafted_layers(model):
                mlp._modules["moe"] = LoopPescBlock.from_pesc(mlp.moe)  # same weights, same recorder
            path, relabel = "loop", None
    if settings.four_bit:
        from peft import prepare_model_for_kbit_training

        from ..train.quantize import keep_trainable_layout

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_trainable_layout(model)
    lora = LoraSettings()
    lora_cfg = LoraConfig(r=settings.lora_rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=_lora_targets(model), bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers a deprecated question
        torch.manual_seed(settings.seed)  # identical LoRA init in every variant
        peft_model = get_peft_model(model, lora_cfg)
    use_lane_dropout(peft_model)  # the dropout training uses (the loop reference's too: dispatch is compared)
    for key, p in new_parameters(model).items():
        if p.is_floating_point() and not is_balance_bias(key):
            p.requires_grad_(True)
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    blocks = [m for n, m in model.named_modules() if n.endswith(".moe")]  # PESC's, or the loop reference's
    if method.builds_moe and not any(p.requires_grad for b in blocks for p in b.experts.parameters()):
        # NF4 copies: only the router trains
        dims = dataclasses.replace(dims, moe=dataclasses.replace(dims.moe, experts_train=False))
    optimizer = adamw(trainable, lr=1e-4)  # as `sparsecraft train` makes it (fused where it can be)
    gen = torch.Generator().manual_seed(settings.seed)
    ids = torch.randint(dims.vocab, (settings.batch_size, settings.seq_len), generator=gen).to(device)
    autocast = autocast_for(settings, device)

    def step() -> None:
        with autocast():
            out = peft_model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        optimizer.step()

    def reset() -> None:
        optimizer.zero_grad(set_to_none=True)

    return Variant(
        level="model", method=name, path=path, tokens=tokens,
        flops=model_flops(name, settings.batch_size, settings.seq_len, dims, settings.lora_rank),
        flops_for_path=lambda label: model_flops(name, settings.batch_size, settings.seq_len, dims,
                                                 settings.lora_rank, label),
        step=step, reset=reset, model=peft_model,
        extra={"trainable_params": sum(p.numel() for p in trainable), "vocab": dims.vocab}, relabel=relabel,
    )


def prompt_ids(settings: BenchSettings, batch: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Random prompts `[batch, min(seq_len, 16)]`, the same for every variant (short: decode, not prefill)."""
    gen = torch.Generator().manual_seed(settings.seed + batch)
    return torch.randint(vocab, (batch, min(settings.seq_len, 16)), generator=gen).to(device)


def greedy_decode(variant: Variant, ids: torch.Tensor, new_tokens: int, settings: BenchSettings,
                  device: torch.device) -> torch.Tensor:
    """Exactly `new_tokens` greedy tokens per row with the KV cache; returns only the new ids `[B, new]`.
    The model must already be in eval mode (the caller switches all variants at once)."""
    model = variant.model
    config = model.config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    with torch.inference_mode(), autocast_for(settings, device)():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=pad,
            temperature=None, top_p=None, top_k=None,
        )
    return out[:, ids.shape[1]:]
