"""What a method is: the one interface training, checkpoints, reports, routes, bench and UpIT use.

A method turns a dense causal LM into something trainable (`build`), says which parameters it added
(`new_parameters`), rebuilds its structure when a saved directory is loaded (`restore`), writes a complete base
for standalone saves (`standalone_base_state`), names its parameter parts for reports (`part_of`) and tells the
memory estimator what one crafted layer holds per token (`moe_bytes_per_token`). Methods that UpIT can fill
from an expert set (`expert_kind`) also read one expert's state from a dense-stage model and load a set into a
built MoE.

Subclasses set the class attributes and override what differs; each lives in its own module and is registered
by name in `methods/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from ..config import CraftConfig
from ..errors import ConfigError, CraftError
from ..moe.layers import detach_moe
from ..surgery import crafted_layers, new_parameters, unmark_crafted
from .expert_keys import by_layer


class Method:
    """A registered way of crafting a model. Class attributes describe it; methods do the work.

    Attributes:
        name: the recipe's `method:` and the `method` a crafted directory's config.json records.
        title: how reports name it (`PESC`, `Sparse Upcycling`, ...).
        builds_moe: False only for the dense baseline (no router, no experts).
        crafts_from_base: `craft` needs nothing but the base and a CraftConfig (what `sparsecraft craft`, the dry
            run and the bench offer); False for layers that are built from other material (UpIT expert sets).
        expert_kind: the UpIT expert kind this method's MoE is built from (`adapter`, `ffn`, `lora`), or None.
        experts_full_precision: the experts are copies of base weights that train, so an NF4 base is
            quantised after the method is applied instead of on load.
        experts_may_idle: an expert may take no part in a step's graph (DDP needs `find_unused_parameters`).
        options_field: the recipe section holding this method's own options (e.g. `upit`), or None.
        shares_ffn: the dense FFN still runs once per token (False where experts replace it).
        added_parts: the names `part_of` returns, in report order: (router part, expert part).

    UpIT, for methods with an `expert_kind`:
        upit_dense_method: the recipe method of UpIT's dense stage, whose trained state is one expert.
        upit_dense_recipe: recipe fields the dense stage must have (merged over the user's).
        upit_defaults: recipe defaults per stage (`common`, `prepare`, `upcycle`), below the user's fields.
        upit_existing: what `prepare.experts_from` reads for this kind (`peft` adapters, full `checkpoint`s), or
            None when experts come only from the dense stage.
        upit_ffn_lora_is_expert: the dense stage's LoRA on the FFN is the expert (not a shared weight).
        factored_experts: an expert is a product of factors (LoRA B·A), so expansion may merge the product.
    """

    name: str = ""
    title: str = ""
    builds_moe: bool = True
    crafts_from_base: bool = True
    expert_kind: str | None = None
    experts_full_precision: bool = False
    experts_may_idle: bool = False
    options_field: str | None = None
    shares_ffn: bool = True
    added_parts: tuple[str, str] = ("routers", "experts")
    upit_dense_method: str = ""
    upit_dense_recipe: dict = {}
    upit_defaults: dict = {}
    upit_existing: str | None = None
    upit_ffn_lora_is_expert: bool = False
    factored_experts: bool = False
    dense_path_runs_all: bool = False  # its `dense` dispatch runs every expert on every token (FLOP count)

    def __repr__(self) -> str:
        return f"<method {self.name}>"

    # ------------------------------------------------------------------ crafting

    def craft(self, model: nn.Module, config: CraftConfig | None = None, *, seed: int | None = None,
              adapter_dtype: torch.dtype | None = None, **overrides) -> nn.Module:
        """Turn the chosen FFNs of `model` into this method's MoE blocks, in place; returns the model."""
        raise CraftError(f"method {self.name} does not craft models")

    def build(self, model: nn.Module, config: CraftConfig, *, seed: int | None = None,
              adapter_dtype: torch.dtype | None = None, options: Any = None, explicit: Iterable[str] = ()) -> nn.Module:
        """What training does to the loaded base. `options`: the recipe's `options_field` section; `explicit`:
        the crafting fields the user wrote (a method that derives settings must not silently replace those)."""
        return self.craft(model, config, seed=seed, adapter_dtype=adapter_dtype)

    def validate_options(self, options: Any) -> None:
        """One-line ConfigError when the recipe's options for this method are unusable."""

    def restore(self, model: nn.Module, config: CraftConfig, layers: list[int]) -> nn.Module:
        """Rebuild a saved model's structure on its freshly loaded base, before the saved weights are copied in."""
        return self.craft(model, config, layers=layers)

    def uncraft(self, model: nn.Module) -> nn.Module:
        """Remove the MoE blocks, in place, where the dense FFN was kept (`shares_ffn`); CraftError otherwise."""
        if not self.shares_ffn:
            raise CraftError(f"a {self.title} model has no dense FFN to restore; load the dense base instead")
        for _, ffn in crafted_layers(model):
            detach_moe(ffn)
        return unmark_crafted(model)

    # ------------------------------------------------------------------ files and counts

    def new_parameters(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The parameters (and saved buffers) this method added, by state-dict name (what
        `sparsecraft.safetensors` holds)."""
        return new_parameters(model)

    def standalone_base_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The base's state dict for a standalone save, from the model's own entries outside `.moe.`."""
        return state

    def part_of(self, name_in_block: str) -> str:
        """Which of `added_parts` a parameter belongs to, by its name inside the MoE block (`router.weight`)."""
        return self.added_parts[0] if name_in_block.startswith("router") else self.added_parts[1]

    def header(self, config: CraftConfig | None, num_layers: int) -> str:
        """One line for parameter reports."""
        if config is None:
            return "Parameters: dense model (not crafted)"
        return (f"Parameters: {self.title}, {config.num_experts} experts, top-{config.top_k}, {num_layers} crafted "
                "layers")

    def moe_bytes_per_token(self, shape, num_tokens: int) -> tuple[int, str]:
        """Bytes per token one crafted layer holds while it is recomputed and back-propagated, and the formula.

        `shape` is `memory.ModelShape`. The default counts the router: fp32 logits [E], fp32 gates and int64
        indices [k]."""
        e, k = shape.num_experts, shape.top_k
        return 4 * e + 4 * k + 8 * k, "router 4E+12k"

    def expert_macs(self, hidden: int, ffn_macs: int, rank: int) -> int:
        """Multiply-adds of one expert for one token, forward (the benchmark's FLOP floor). `ffn_macs`: the
        dense FFN's multiply-adds per token; `rank`: `adapter_dim`."""
        return 0

    def standalone_block(self, ffn: nn.Module, hidden: int, config: CraftConfig, *,
                         device: torch.device | None = None, dtype: torch.dtype | None = None):
        """`(block, forward)` for the benchmark's block level: this method's MoE block around `ffn` without
        changing `ffn` (it is shared by every variant); `forward(x: [N, h]) -> [N, h]`."""
        raise CraftError(f"method {self.name} has no MoE block")

    # ------------------------------------------------------------------ UpIT expert sets
    # `experts` below is a `methods.expert_set.ExpertSet` (not imported: expert sets are built on the methods)

    def check_expert_keys(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """One-line ConfigError when canonical expert keys (`layers.{i}.{rest}`) do not fit this kind."""

    def read_expert_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """One expert's state under canonical keys, read from a dense-stage model of this kind."""
        raise ConfigError(f"method {self.name} has no expert kind")

    def expert_meta(self, model: nn.Module, config: CraftConfig) -> dict:
        """JSON-able facts about the expert a dense-stage model holds (e.g. LoRA rank and alpha); `config`: the
        crafting settings the dense stage ran with."""
        return {}

    def derived_settings(self, experts) -> dict:
        """CraftConfig fields an expert set fixes beyond `num_experts` and `layers` (e.g. the adapter rank)."""
        return {}

    def check_experts_fit(self, model: nn.Module, per_layer: dict[int, dict[str, str]], experts) -> None:
        """One-line ConfigError, before anything changes, when the set's experts cannot go into `model`."""

    def build_from_experts(self, model: nn.Module, experts, config: CraftConfig, seed: int | None) -> None:
        """Build this method's MoE on `model` with one expert per state of `experts` (in place); `config`
        already holds what the set fixes (`derived_settings`, `num_experts`, `layers`). Expert e of layer i is
        written through the block's `set_expert_weights(e, {rest: state["layers.{i}.{rest}"]})`."""
        per_layer = by_layer(experts.base)
        self.check_experts_fit(model, per_layer, experts)
        self.craft(model, config, seed=seed, adapter_dtype=torch.float32)  # experts that train stay fp32
        for layer, mlp in crafted_layers(model):
            rests = per_layer[layer]
            for e, state in enumerate(experts.states):
                mlp.moe.experts.set_expert_weights(e, {rest: state[key] for rest, key in rests.items()})
