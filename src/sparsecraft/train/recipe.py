"""Training recipes: one YAML file holds a whole run; any field can be overridden as `a.b=value`.

The recipe only names things the code exposes: every section is a dataclass below, unknown fields and wrong
types are one-line `ConfigError`s raised before any data or model is touched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ATTENTION_LORA_TARGETS, FFN_LORA_TARGETS, CraftConfig
from ..errors import ConfigError
from ..hub import looks_like_repo_id
from ..methods import get_method
from ..yaml_settings import build_dataclass, merge, parse_overrides, read_yaml
from .optim import OPTIMIZERS

QUANTIZATIONS = ("nf4", "none")
PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class LoraSettings:
    """LoRA through peft on attention (and optionally the shared FFN). Defaults from the PESC reference."""

    enabled: bool = True
    r: int = 64
    alpha: int = 16
    dropout: float = 0.1
    targets: list = field(default_factory=lambda: list(ATTENTION_LORA_TARGETS))
    ffn: bool = False  # also LoRA on the shared FFN (gate/up/down), as the reference training did
    ffn_targets: list = field(default_factory=lambda: list(FFN_LORA_TARGETS))


@dataclass
class OptimSettings:
    name: str = "adamw"  # adamw | paged_adamw_32bit (the QLoRA paper's) | paged_adamw_8bit: CUDA only
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float = 0.3
    schedule: str = "constant"
    warmup_ratio: float = 0.03


@dataclass
class TrainSettings:
    max_steps: int = 0  # 0: run `epochs` epochs
    epochs: float = 1.0
    batch_size: int = 4  # per process, per micro-step
    grad_accum: int = 1
    gradient_checkpointing: bool = True
    precision: str = "auto"  # auto: bf16 on CUDA with bf16 and on CPUs with AMX/AVX512-BF16, else fp32
    compile: bool = False  # the PESC blocks' math under torch.compile (moe/compiled.py)
    trim_heap: bool = False  # CPU: give freed heap back to the OS between layers (less peak RSS, slower; heap.py)
    seed: int = 0
    eval_every: int = 0  # 0: evaluate at the end only
    eval_batches: int = 0  # 0: the whole held-out split


@dataclass
class CheckpointSettings:
    every: int = 50  # optimizer steps; 0 disables intermediate checkpoints
    keep: int = 2


@dataclass
class LoggingSettings:
    every: int = 1
    tensorboard: bool = True  # when tensorboard is installed
    progress: bool = True


@dataclass
class UpitSettings:
    """Method `upit`: the MoE is built from an UpIT expert set (`sparsecraft.upit`), not from the base alone."""

    experts: str = ""  # an ExpertSet directory (methods.expert_set.save_expert_set)
    router: str = ""  # optional pre-trained router rows: safetensors {layers.{i}.router: [E, h]}


@dataclass
class Recipe:
    """A whole training run."""

    model: str = "smollm2-135m"
    method: str = "pesc"
    output_dir: str = "runs/sparsecraft"
    quantization: str = "nf4"
    adapter_dtype: str = "float32"  # router/adapters: float32 or bfloat16, never quantised
    craft: dict = field(default_factory=dict)  # CraftConfig fields
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: dict = field(default_factory=dict)  # sparsecraft.data.DataConfig fields
    optim: OptimSettings = field(default_factory=OptimSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    upit: UpitSettings = field(default_factory=UpitSettings)  # method upit only
    allow_pickle: bool = False  # read pickled .bin weights (they can run code when loaded)
    push_to_hub: str = ""  # a hub repo ID: the trained model is uploaded there when the run ends
    push_private: bool = False  # create that repo private

    def validate(self) -> None:
        method = get_method(self.method)  # one line naming the registered methods otherwise
        _choice("quantization", self.quantization, QUANTIZATIONS)
        _choice("adapter_dtype", self.adapter_dtype, ("float32", "bfloat16"))
        _choice("train.precision", self.train.precision, PRECISIONS)
        _choice("optim.schedule", self.optim.schedule, SCHEDULES)
        _choice("optim.name", self.optim.name, OPTIMIZERS)
        for name, value in (("train.batch_size", self.train.batch_size), ("train.grad_accum", self.train.grad_accum),
                            ("lora.r", self.lora.r), ("checkpoint.keep", self.checkpoint.keep),
                            ("logging.every", self.logging.every)):
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        for name, value in (("train.max_steps", self.train.max_steps), ("checkpoint.every", self.checkpoint.every),
                            ("train.eval_every", self.train.eval_every),
                            ("train.eval_batches", self.train.eval_batches)):
            if value < 0:
                raise ConfigError(f"{name} must be >= 0 (0 turns it off), got {value}")
        # every number is checked as finite: NaN fails no `<` test (a NaN max_grad_norm would silently turn
        # clipping off) and an infinite lr diverges at the first step
        _in_range("train.epochs", self.train.epochs, low=0, low_open=True)
        _in_range("optim.lr", self.optim.lr, low=0, low_open=True)
        _in_range("optim.eps", self.optim.eps, low=0, low_open=True)
        _in_range("optim.weight_decay", self.optim.weight_decay, low=0)
        _in_range("optim.max_grad_norm", self.optim.max_grad_norm, low=0)
        _in_range("optim.warmup_ratio", self.optim.warmup_ratio, low=0, high=1)
        _in_range("lora.alpha", self.lora.alpha, low=0, low_open=True)
        _in_range("lora.dropout", self.lora.dropout, low=0, high=1)
        betas = self.optim.betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {betas!r}")
        for beta in betas:
            _in_range("optim.betas", beta, low=0, high=1)
        if method.builds_moe:
            self.craft_config()  # validates the craft section
        if method.options_field:
            method.validate_options(getattr(self, method.options_field))
        if self.push_to_hub and (not looks_like_repo_id(self.push_to_hub) or "@" in self.push_to_hub):
            raise ConfigError(f"push_to_hub must be a hub repo ID (org/name), got {self.push_to_hub!r}")
        if not self.data.get("sources"):
            raise ConfigError("data.sources is empty: name at least one data file (or pass data=FILE)")
        from ..data import DataConfig

        DataConfig.from_dict(self.data)

    def craft_config(self) -> CraftConfig:
        return CraftConfig.from_dict(self.craft)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _in_range(name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False) -> None:
    """A finite number with `low <= value < high` (`low < value` when `low_open`); one-line ConfigError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value < high
    if not ok:
        span = f"({low}, {high})" if low_open else f"[{low}, {high})"
        raise ConfigError(f"{name} must be a finite number in {span}, got {value!r}")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


# Shorthands a user types often: `max_steps=10` means `train.max_steps=10`.
SHORTHANDS = {
    "max_steps": ("train", "max_steps"), "epochs": ("train", "epochs"), "batch_size": ("train", "batch_size"),
    "grad_accum": ("train", "grad_accum"), "seed": ("train", "seed"), "lr": ("optim", "lr"),
    "experts": ("craft", "num_experts"), "top_k": ("craft", "top_k"), "adapter_dim": ("craft", "adapter_dim"),
}


def _data_file(value: Any, data: Any) -> dict:
    """`data=FILE` replaces the sources with one file of detected format."""
    return {**(data or {}), "sources": [{"path": str(value)}], "eval_sources": []}


def merge_recipe(base: dict, extra: dict) -> dict:
    """`extra` (a recipe mapping or one parsed override) merged into `base`, with the top-level shorthands
    (`SHORTHANDS`, `data=FILE`)."""
    return merge(base, extra, shorthands=SHORTHANDS, expand={"data": _data_file})


def build_recipe(data: dict) -> Recipe:
    """A `Recipe` from its mapping, fields and types checked (not `validate`d)."""
    return build_dataclass(Recipe, data, what="recipe")


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe and apply `key=value` overrides (relative paths are relative to the working directory)."""
    data: dict = read_yaml(path, "recipe") if path is not None else {}
    for override in parse_overrides(overrides or []):
        data = merge_recipe(data, override)
    recipe = build_recipe(data)
    recipe.validate()
    return recipe
