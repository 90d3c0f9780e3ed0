"""Crafting settings: what a PESC MoE layer looks like and which layers get one.

`CraftConfig` is a plain dataclass so it round-trips through JSON (the crafted model's config file) and YAML
(training recipes) without sparsecraft's Python objects. Validation raises `ConfigError` with one line that
names the field and the value, because these errors reach the command line as they are.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple

from .errors import ConfigError

ROUTING_ORDERS = ("topk_softmax", "softmax_topk")
DISPATCH_PATHS = ("auto", "rule", "dense", "grouped", "padded", "sorted", "gathered", "triton", "loop")
COMBINE_FORMS = ("residual", "per_slot")
ROUTER_DTYPES = ("float32", "model")
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
BALANCE_SCOPES = ("micro", "global")
AUX_REDUCTIONS = ("mean", "sum")
# LoRA on attention, the default of training recipes, the dry run and the memory estimate (peft name suffixes)
ATTENTION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_LORA_TARGETS = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")  # gated MLPs, split or fused


@dataclass
class CraftConfig:
    """PESC crafting settings.

    Attributes:
        num_experts: number of adapter experts E per crafted layer.
        top_k: experts each token is routed to (k <= E).
        adapter_dim: bottleneck width r of each adapter (`W_down: [r, h]`, `W_up: [h, r]`).
        scaling: s in `A_e(F) = s * W_up_e GELU(W_down_e dropout(F))`.
        activation: adapter non-linearity; exact GELU as in PESC by default.
        dropout: dropout on the adapter input (0.1 in the reference training code); off in eval mode.
        routing: `topk_softmax` (PESC/Camelidae: softmax over the k kept logits) or `softmax_topk`
            (Mixtral/Sparsetral: softmax over all E, then top-k).
        normalize_topk: for `softmax_topk`, renormalise the k kept probabilities to sum to 1.
        router_dtype: `float32` (default, for training) or `model` (router in the model's dtype, which is what
            the published bf16 checkpoints computed).
        combine: `residual` computes `F + sum_j g_j A_j(F)`; `per_slot` computes `sum_j g_j (F + A_j(F))` as the
            published code does (identical in fp32, differs in bf16 where gates do not sum to exactly 1).
        aux_loss_coef: alpha of the Switch load-balancing loss added to `loss` when labels are given.
        z_loss_coef: coefficient of the router z-loss (0 disables it being added; it is still reported).
        layers: `"all"`, `"every:N"` (layers 0, N, 2N, ...), or an explicit list of layer indices.
        dispatch: `auto` times the candidate paths per call shape; `rule` picks by a fixed shape rule
            (reproducible across processes); `dense`, `grouped`, `padded`, `sorted`, `gathered`, `triton`,
            `loop` force one.
    """

    # Each field's metadata is its command-line option (see `craft_fields`): `help`, and where needed `flag`
    # (default `--field-name`), `choices`, `type` (default: the annotation) or `cli: False` (not exposed).
    num_experts: int = field(default=8, metadata={"help": "number of experts E per crafted layer", "flag": "--experts"})
    top_k: int = field(default=2, metadata={"help": "experts each token is routed to, k (k <= E)"})
    adapter_dim: int = field(default=64, metadata={"help": "adapter bottleneck width r"})
    scaling: float = field(default=1.0, metadata={"help": "adapter output scaling s"})
    activation: str = field(default="gelu", metadata={
        "help": "adapter non-linearity (exact GELU as in PESC by default)", "choices": ACTIVATIONS})
    dropout: float = field(default=0.1, metadata={"help": "dropout on the adapter input (training only)"})
    routing: str = field(default="topk_softmax", metadata={
        "help": "topk_softmax (PESC: softmax over the k kept logits) or softmax_topk (Mixtral: softmax over all "
                "E, then top-k)", "choices": ROUTING_ORDERS})
    normalize_topk: bool = field(default=True, metadata={
        "help": "with softmax_topk, renormalise the k kept probabilities to sum to 1"})
    router_dtype: str = field(default="float32", metadata={
        "help": "router precision: float32, or model (the model's dtype, as the published bf16 checkpoints)",
        "choices": ROUTER_DTYPES})
    combine: str = field(default="residual", metadata={
        "help": "residual: F + sum_j g_j A_j(F); per_slot: sum_j g_j (F + A_j(F)) as the published code does",
        "choices": COMBINE_FORMS})
    aux_loss_coef: float = field(default=0.01, metadata={"help": "load-balancing (Switch) loss weight alpha"})
    z_loss_coef: float = field(default=0.0, metadata={"help": "router z-loss weight (0: reported, not added)"})
    balance: str = field(default="micro", metadata={
        "help": "where the balance loss counts expert use: micro (each micro-batch, all data-parallel ranks) or "
                "global (every micro-batch of the optimizer step so far, all ranks; Qwen's global-batch balance)",
        "choices": BALANCE_SCOPES})
    aux_reduce: str = field(default="mean", metadata={
        "help": "combine the layers' balance losses by their mean, or their sum (Switch Transformer)",
        "choices": AUX_REDUCTIONS})
    bias_balance: bool = field(default=False, metadata={
        "help": "auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias on the logits for top-k selection "
                "only, nudged after each step towards the mean load"})
    bias_update_rate: float = field(default=0.001, metadata={
        "help": "u in bias_i += u * sign(mean load - load_i), after each optimizer step"})
    layers: Any = field(default="all", metadata={
        "help": "crafted layers: 'all', 'every:N' or a list like 0,2,5", "type": str})
    dispatch: str = field(default="auto", metadata={
        "help": "expert dispatch path: auto times the candidates once per call shape and keeps the fastest, "
                "rule picks by a fixed shape rule (reproducible), the others force one", "choices": DISPATCH_PATHS})
    extra: dict = field(default_factory=dict, metadata={"cli": False})

    def __post_init__(self) -> None:
        self.validate()

    @property
    def constant_gate(self) -> bool:
        """Whether every token's gate is exactly 1 (top-1 with the gate renormalised over the one kept expert):
        the language-model loss then gives the router no gradient, only the balance losses train it."""
        return self.top_k == 1 and (self.routing == "topk_softmax" or self.normalize_topk)

    def validate(self) -> None:
        """Raise `ConfigError` with a one-line message for the first bad field."""
        for name in ("num_experts", "top_k", "adapter_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        if not _is_number(self.scaling) or not 0 < self.scaling < math.inf:
            raise ConfigError(f"scaling must be a positive number, got {self.scaling!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.normalize_topk, bool):
            raise ConfigError(f"normalize_topk must be true or false, got {self.normalize_topk!r}")
        for name in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value < math.inf:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        _check_choice("routing", self.routing, ROUTING_ORDERS)
        _check_choice("dispatch", self.dispatch, DISPATCH_PATHS)
        _check_choice("combine", self.combine, COMBINE_FORMS)
        _check_choice("router_dtype", self.router_dtype, ROUTER_DTYPES)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("balance", self.balance, BALANCE_SCOPES)
        _check_choice("aux_reduce", self.aux_reduce, AUX_REDUCTIONS)
        if not isinstance(self.bias_balance, bool):
            raise ConfigError(f"bias_balance must be true or false, got {self.bias_balance!r}")
        if not _is_number(self.bias_update_rate) or not 0 <= self.bias_update_rate < math.inf:
            raise ConfigError(f"bias_update_rate must be a non-negative number, got {self.bias_update_rate!r}")
        parse_layer_spec(self.layers, num_layers=None)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CraftConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown crafting setting(s): {', '.join(unknown)}")
        return cls(**data)


class CraftField(NamedTuple):
    """One `CraftConfig` field as a command-line option (what `craft_fields` yields)."""

    name: str  # the dataclass field
    flag: str  # `--experts` for num_experts, else `--field-name`
    type: type  # int, float, str or bool (bool: a --flag/--no-flag pair)
    default: Any
    help: str
    choices: tuple[str, ...] | None


def craft_fields() -> Iterator[CraftField]:
    """The `CraftConfig` fields exposed as options, in field order, from each field's metadata.

    The help text is defined once, in the field's metadata; `extra` (`cli: False`) is left out. The argparse
    side is `sparsecraft.cli.options`.
    """
    hints = typing.get_type_hints(CraftConfig)
    for f in dataclasses.fields(CraftConfig):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        if "help" not in meta:
            raise TypeError(f"CraftConfig.{f.name} has no help text in its field metadata")
        yield CraftField(
            name=f.name, flag=meta.get("flag", "--" + f.name.replace("_", "-")), type=meta.get("type", hints[f.name]),
            default=f.default, help=meta["help"], choices=meta.get("choices"),
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def parse_layer_spec(spec: Any, num_layers: int | None) -> list[int] | None:
    """Turn a layer selection into sorted layer indices.

    `spec` is `"all"`, `"every:N"`, a comma-separated string `"0,2,5"` or a list of ints. With `num_layers=None`
    only the syntax is checked and None is returned.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text == "all":
            return None if num_layers is None else list(range(num_layers))
        if text.startswith("every:"):
            step_text = text.split(":", 1)[1]
            if not step_text.isdigit() or int(step_text) <= 0:
                raise ConfigError(f"layers 'every:N' needs a positive integer N, got {spec!r}")
            return None if num_layers is None else list(range(0, num_layers, int(step_text)))
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts or not all(p.lstrip("-").isdigit() for p in parts):
            raise ConfigError(f"layers must be 'all', 'every:N' or a list like '0,2,5'; got {spec!r}")
        spec = [int(p) for p in parts]
    if not isinstance(spec, (list, tuple)) or not spec or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in spec
    ):
        raise ConfigError(f"layers must be 'all', 'every:N' or a non-empty list of integers; got {spec!r}")
    if num_layers is None:
        return None
    resolved = sorted({i + num_layers if i < 0 else i for i in spec})
    bad = [i for i in resolved if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"layer index {bad[0]} is out of range for a model with {num_layers} decoder layers")
    return resolved
