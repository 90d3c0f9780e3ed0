"""What one `sparsecraft bench` run measures: its settings, the model shapes and the methods.

Shapes are transformers configs with the real sizes (hidden, FFN width, heads, KV heads, vocab, depth) of the
named models; weights are random, so no file or hub is needed. `--layers N` cuts the depth so a 7B shape fits
on a small machine: per-layer costs and their ratios do not change with depth, only the embedding and
`lm_head` share does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..config import DISPATCH_PATHS, CraftConfig
from ..errors import ConfigError
from ..methods import Method, dense_method, get_method, method_names
from ..methods.pesc import PescMethod

LEVELS = ("block", "model")
# A variant is a registered method's name (`dense`, `pesc`, `upcycle`, `mixlora`, ...), `<method>-<path>` to force
# a dispatch path, or `loop`: the bench's own per-expert reference of PESC (`reference.py`).
BASELINE = dense_method().name
REFERENCE = "loop"
REFERENCE_OF = PescMethod.name
METHODS = (BASELINE, "pesc", "pesc-dense", "pesc-grouped", "pesc-sorted", "upcycle", REFERENCE)  # the default set
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# name -> (config class name, sizes). Sizes as published in each model's config.json.
SHAPES: dict[str, tuple[str, dict]] = {
    "llama2-7b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
        vocab_size=32000, num_hidden_layers=32, max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "qwen2-7b": ("Qwen2Config", dict(
        hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
        vocab_size=152064, num_hidden_layers=28, max_position_embeddings=32768, rms_norm_eps=1e-6,
        tie_word_embeddings=False)),
    "smollm2-135m": ("LlamaConfig", dict(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, num_hidden_layers=30, max_position_embeddings=8192, rms_norm_eps=1e-5,
        tie_word_embeddings=True)),
    # for tests and smoke runs: every size a multiple of 4 so the grouped path's stride rule holds in fp32
    "tiny": ("LlamaConfig", dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, num_hidden_layers=2, max_position_embeddings=512)),
}


MEMORY_ALLOCATORS = ("default", "live", "trim")  # trim: glibc as configured + train.trim_heap's trims
# glibc's environment form of mallopt(M_MMAP_THRESHOLD): fixing it also turns off the dynamic threshold
LIVE_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


@dataclass
class BenchSettings:
    """Every setting of a bench run (the CLI flags); JSON-able, so a worker process gets the same ones."""

    levels: list = field(default_factory=lambda: list(LEVELS))
    methods: list = field(default_factory=lambda: list(METHODS))
    shape: str = "smollm2-135m"
    model: str | None = None  # a real dense base (directory, .gguf, built-in name) instead of `shape`
    allow_pickle: bool = False  # `model` may be read from pickled .bin weights (they can run code)
    layers: int | None = None  # cut the model to its first N decoder layers
    experts: int = 8
    top_k: int = 2
    adapter_dim: int = 64
    tokens: int = 512  # block level: N = tokens through the block per step
    seq_len: int = 512  # model level
    batch_size: int = 1  # model level
    dtype: str = "float32"
    four_bit: bool = False  # model level: NF4 base
    threads: int | None = None
    repeats: int = 10
    warmup: int = 2
    decode_tokens: int = 32  # 0 skips decoding
    decode_repeats: int = 3
    decode_batches: list = field(default_factory=lambda: [1, 8])
    lora_rank: int = 16
    device: str = "auto"
    seed: int = 0
    memory: bool = True  # peak memory in a separate process per variant
    memory_steps: int = 3
    # "default": glibc as configured; "live": a fixed 128 KiB mmap threshold, so freed tensors go back to the OS
    # and peak RSS tracks live tensors rather than heap fragmentation (see docs/benchmarks.md); "trim": glibc as
    # configured, freed heap handed back between decoder layers as `train.trim_heap: true` does
    memory_allocator: str = "default"

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad setting."""
        if self.memory_allocator not in MEMORY_ALLOCATORS:
            raise ConfigError(f"memory allocator must be one of {', '.join(MEMORY_ALLOCATORS)}, "
                              f"got {self.memory_allocator!r}")
        bad_levels = [lv for lv in self.levels if lv not in LEVELS]
        if bad_levels or not self.levels:
            raise ConfigError(f"--level must be block, model or both; got {','.join(self.levels) or 'nothing'}")
        if not self.methods:
            raise ConfigError(f"no method to measure; choose from {', '.join(variant_names())}")
        for name in self.methods:
            parse_variant(name)
        if self.model is None and self.shape not in SHAPES:
            raise ConfigError(f"unknown --shape {self.shape!r}; choose from {', '.join(SHAPES)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        for name in ("tokens", "seq_len", "batch_size", "repeats", "lora_rank", "memory_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("warmup", "decode_tokens", "decode_repeats"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.layers is not None and self.layers <= 0:
            raise ConfigError(f"--layers must be positive, got {self.layers}")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError(f"--threads must be positive, got {self.threads}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda[:N]; got {self.device!r}")
        self.craft_config("auto")  # experts / top-k / adapter-dim checked by CraftConfig

    def craft_config(self, dispatch: str = "auto") -> CraftConfig:
        """The crafting settings of every MoE variant: CraftConfig defaults except E, k, r and the path."""
        return CraftConfig(num_experts=self.experts, top_k=self.top_k, adapter_dim=self.adapter_dim,
                           dispatch=dispatch)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BenchSettings":
        return cls(**data)


def variant_names() -> tuple[str, ...]:
    """What `--methods` accepts (besides `<method>-<path>` and PESC's `...:compiled`)."""
    return (BASELINE, *method_names(crafts=True), REFERENCE)


COMPILED_SUFFIX = ":compiled"  # `pesc:compiled`, `pesc-dense:compiled`: the PESC blocks under torch.compile


def is_compiled_variant(name: str) -> bool:
    return name.endswith(COMPILED_SUFFIX)


def parse_variant(name: str) -> tuple[Method, str]:
    """`(method, dispatch)` of a variant name; `loop` is PESC run by the bench's reference layer; a
    `:compiled` suffix (PESC only) runs its blocks compiled. ConfigError naming the choices for anything else."""
    if is_compiled_variant(name):
        method, dispatch = parse_variant(name.removesuffix(COMPILED_SUFFIX))
        if method.name != REFERENCE_OF or name.startswith(REFERENCE):
            raise ConfigError(f"{name!r}: only PESC variants can be compiled (pesc:compiled, pesc-<path>:compiled)")
        return method, dispatch
    if name == REFERENCE:
        return get_method(REFERENCE_OF), "auto"
    base, _, path = name.partition("-")
    if base not in variant_names() or (path and path not in DISPATCH_PATHS):
        raise ConfigError(f"unknown method {name!r}; choose from {', '.join(variant_names())}, or "
                          f"<method>-<path> with a path from {', '.join(DISPATCH_PATHS)}")
    return get_method(base), path or "auto"


def shape_config(settings: BenchSettings):
    """A transformers config of `settings.shape`, depth cut to `settings.layers` when given."""
    import transformers

    class_name, sizes = SHAPES[settings.shape]
    sizes = dict(sizes)
    if settings.layers is not None:
        sizes["num_hidden_layers"] = min(settings.layers, sizes["num_hidden_layers"])
    return getattr(transformers, class_name)(**sizes)
