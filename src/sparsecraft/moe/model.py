"""Router losses in the model's own forward path.

A crafted causal LM is switched to a subclass of its own class whose forward runs the original forward while a
`RoutingRecorder` collects each PESC layer's routing, then adds `aux_loss_coef * L_balance + z_loss_coef * L_z`
to `loss` when labels are given. So whoever calls the model (Trainer, accelerate, lm-eval, a user's loop, a
peft wrapper) trains the router, and padding is known from the attention mask.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .layers import RoutingRecord
from .losses import balance_counts, expert_counts, load_balancing_loss, router_z_loss


@dataclass
class PescCausalLMOutput(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus the router z-loss and per-layer expert counts.

    Attributes:
        aux_loss: load-balancing loss averaged over crafted layers (without its coefficient), fp32 scalar.
        router_z_loss: router z-loss averaged over crafted layers (without its coefficient), fp32 scalar.
        expert_counts: `[num_crafted_layers, E]` int64, (token, slot) assignments per expert over real tokens.
        loss: LM loss + `aux_loss_coef * aux_loss + z_loss_coef * router_z_loss` when labels were given.
    """

    router_z_loss: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None


def token_mask_for(record: RoutingRecord, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Bool `[N]` mask of real tokens for a layer's flattened routing, from a 2-D attention mask.

    With a KV cache the mask covers past + current positions; the current tokens are its last columns. Masks
    of any other shape (4-D custom masks) are not interpreted: every token counts.
    """
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    seq = record.num_tokens_per_row
    mask = attention_mask[:, -seq:].reshape(-1).to(device=record.logits.device, dtype=torch.bool)
    return mask if mask.numel() == record.logits.shape[0] else None


def router_losses(
    records: list[RoutingRecord], num_experts: int, attention_mask: torch.Tensor | None, sync: bool = False,
    reduce: str = "mean", step_counts: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balance loss (layers combined by `reduce`: mean or sum) and z-loss (mean over layers), and `[L, E]`
    expert counts, all over real tokens only.

    `sync`: statistics over all processes' tokens (multi-process training; every rank must take part).
    `step_counts`: global balance, `{layer: [E + 1] counts and tokens}` of the step's earlier micro-batches,
    used for `f_i` and updated in place; None: each call on its own (micro balance)."""
    device = records[0].logits.device
    balance, z, counts = [], [], []
    for rec in records:
        mask = token_mask_for(rec, attention_mask)
        logits = rec.logits_for_loss()
        seen = None
        if step_counts is not None:
            seen = balance_counts(rec.indices, num_experts, mask, sync, step_counts.get(rec.layer))
            step_counts[rec.layer] = seen
        balance.append(load_balancing_loss(logits, rec.indices, num_experts, mask, sync, seen).to(device))
        z.append(router_z_loss(logits, mask, sync).to(device))
        counts.append(expert_counts(rec.indices, num_experts, mask).to(device))
    combined = torch.stack(balance)
    return combined.sum() if reduce == "sum" else combined.mean(), torch.stack(z).mean(), torch.stack(counts)


_PESC_LM_CLASSES: dict[type, type] = {}
_SIGNATURES: dict[type, inspect.Signature] = {}


def _signature(cls: type) -> inspect.Signature:
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(cls.forward)
    return _SIGNATURES[cls]


def _accepts(cls: type, name: str) -> bool:
    params = _signature(cls).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _argument(cls: type, name: str, args: tuple, kwargs: dict):
    if name in kwargs:
        return kwargs[name]
    params = list(_signature(cls).parameters)[1:]  # drop self
    if name in params and params.index(name) < len(args):
        return args[params.index(name)]
    return None


def _pesc_lm_forward(self, *args, **kwargs):
    base_cls = type(self)._sparsecraft_base_class
    return_dict = kwargs.pop("return_dict", None)
    want_logits = kwargs.pop("output_router_logits", None)
    labels = _argument(base_cls, "labels", args, kwargs)
    attention_mask = _argument(base_cls, "attention_mask", args, kwargs)
    recorder = self._sparsecraft_recorder
    recorder.start()
    if _accepts(base_cls, "return_dict"):
        kwargs["return_dict"] = True
    try:
        out = base_cls.forward(self, *args, **kwargs)
    finally:
        records = recorder.stop()
    if not hasattr(out, "logits"):
        return out  # not a transformers causal-LM output: nothing to attach the router losses to
    craft_cfg = self._sparsecraft_config
    need_losses = labels is not None or self.training or bool(want_logits)
    aux = z = counts = None
    loss = out.loss
    if records and need_losses:
        sync = recorder.sync_across_processes and self.training
        step_counts = recorder.step_counts if craft_cfg.balance == "global" and self.training else None
        aux, z, counts = router_losses(records, craft_cfg.num_experts, attention_mask, sync, craft_cfg.aux_reduce,
                                       step_counts)
        if loss is not None:
            loss = loss + craft_cfg.aux_loss_coef * aux.to(loss.device) + craft_cfg.z_loss_coef * z.to(loss.device)
    result = PescCausalLMOutput(
        loss=loss,
        aux_loss=aux,
        router_z_loss=z,
        expert_counts=counts,
        logits=out.logits,
        past_key_values=out.past_key_values,
        hidden_states=out.hidden_states,
        attentions=out.attentions,
        router_logits=tuple(r.logits for r in records) if want_logits else None,
    )
    return result.to_tuple() if return_dict is False else result


def _pesc_activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, *args, **kwargs):
    """Default to non-reentrant checkpointing (also when given `{}`, as peft's k-bit preparation passes).

    The router losses are computed from logits recorded during the forward. A reentrant checkpoint runs that
    forward under `no_grad`, so the balance loss could then only reach the router weight (see
    `RoutingRecord.logits_for_loss`), not the layers below it. An explicit `use_reentrant=True` is respected.
    """
    checkpoint_kwargs = dict(activation_checkpointing_kwargs or {})
    checkpoint_kwargs.setdefault("use_reentrant", False)
    base_cls = type(self)._sparsecraft_base_class
    return base_cls._activation_checkpointing_enable(self, checkpoint_kwargs, *args, **kwargs)


# How `save_pretrained` writes a crafted model. Saving is `checkpoint/`'s job, above this package: it hands its
# writer in with `set_saver` when it is imported (`import sparsecraft` does), so nothing here reaches up.
_saver = None


def set_saver(saver) -> None:
    """Install `saver(model, directory, *, standalone)` as what a crafted model's `save_pretrained` calls."""
    global _saver
    _saver = saver


def _pesc_save_pretrained(self, save_directory, *, standalone: bool = True, **kwargs):
    """Write a sparsecraft directory (loads with `sparsecraft.load` or, after `import sparsecraft`,
    `AutoModelForCausalLM.from_pretrained`). Standalone by default, since the base weights may have been
    changed; `standalone=False` refers to the base instead. transformers' other options are ignored."""
    if _saver is None:
        raise RuntimeError("saving a crafted model needs `import sparsecraft` (its checkpoint writer)")
    return _saver(self, save_directory, standalone=standalone)


def _with_signature_of(original, implementation):
    """`implementation` under `original`'s name, docs and signature: generate() inspects the forward signature
    (e.g. whether it takes `logits_to_keep`) to decide what to pass."""

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        return implementation(self, *args, **kwargs)

    return forward


def pesc_lm_class(base_cls: type) -> type:
    """Subclass of a causal-LM class whose forward adds the router losses (cached per base class)."""
    if base_cls not in _PESC_LM_CLASSES:
        members = {
            "forward": _with_signature_of(base_cls.forward, _pesc_lm_forward),
            "save_pretrained": _pesc_save_pretrained,
            "_sparsecraft_base_class": base_cls,
            "__module__": __name__,
        }
        if hasattr(base_cls, "_activation_checkpointing_enable"):
            members["_activation_checkpointing_enable"] = _pesc_activation_checkpointing_enable
        _PESC_LM_CLASSES[base_cls] = type(f"Pesc{base_cls.__name__}", (base_cls,), members)
    return _PESC_LM_CLASSES[base_cls]
