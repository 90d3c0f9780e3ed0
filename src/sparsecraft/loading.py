"""One entry point to get a model: `load` for anything sparsecraft can read, `craft_from` for base + craft."""

from __future__ import annotations

import os

import torch

from .config import CraftConfig
from .craft import craft
from .hub import looks_like_repo_id, snapshot, split_revision
from .sources import BUILTIN_MODELS, hub_options, load_base_model, resolve_base


def load(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    **from_pretrained_kwargs,
):
    """Load a model ready for inference (eval mode).

    `path` is a sparsecraft directory (referenced or standalone), a published Camelidae / Qwen2idae /
    Sparsetral directory, a dense base (transformers directory, GGUF file, built-in name such as
    `smollm2-135m`), or a hub repo ID of any of these (`org/name`, `org/name@revision`, or `revision=`).
    `dtype`, `device` and other keyword arguments (`token`, `cache_dir`, ...) go to `from_pretrained` of the
    base. Pickled `.bin` weights are read only with `allow_pickle=True`.
    """
    from .checkpoint.crafted import is_crafted_dir, load_crafted, read_config

    text = str(path)
    hub = hub_options(from_pretrained_kwargs)
    if not os.path.exists(text) and looks_like_repo_id(text) and text not in BUILTIN_MODELS:
        text = _hub_folder_if_sparsecraft(text, revision, hub) or text
    if os.path.isdir(text) and os.path.isfile(os.path.join(text, "config.json")):
        if is_crafted_dir(text):
            return load_crafted(text, dtype=dtype, device=device, allow_pickle=allow_pickle, **from_pretrained_kwargs)
        from .checkpoint.published import detect_published_layout, load_published

        if detect_published_layout(read_config(text)):
            return load_published(text, allow_pickle=allow_pickle, dtype=dtype, device=device)
    source = resolve_base(text, revision, **hub)
    model = load_base_model(source, dtype=dtype, device=device, allow_pickle=allow_pickle, **from_pretrained_kwargs)
    model._sparsecraft_base = source
    return model.eval()


def _hub_folder_if_sparsecraft(repo: str, revision: str | None, hub: dict) -> str | None:
    """A hub repo holding a sparsecraft or published PESC directory, downloaded whole (its files are what
    `load_crafted` / `load_published` read): the local snapshot folder. None for a plain base model, whose weights
    `from_pretrained` fetches itself."""
    from .checkpoint.crafted import MODEL_TYPE, read_config
    from .checkpoint.published import detect_published_layout

    repo_id, pinned = split_revision(repo)
    revision = revision or pinned
    config = read_config(snapshot(repo_id, revision=revision, allow_patterns=["config.json"], **hub))
    if config.get("model_type") != MODEL_TYPE and not detect_published_layout(config):
        return None
    return str(snapshot(repo_id, revision=revision, **hub))


def craft_from(
    base: str | os.PathLike,
    config: CraftConfig | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    method: str = "pesc",
    revision: str | None = None,
    allow_pickle: bool = False,
    **from_pretrained_kwargs,
):
    """Load a dense base (directory, GGUF file, built-in name or hub ID) and craft it with a registered `method`
    (`pesc`, `upcycle`, `mixlora`, ...). Returns the crafted model."""
    hub = hub_options(from_pretrained_kwargs)
    source = resolve_base(base, revision, **hub)
    model = load_base_model(source, dtype=dtype, device=device, allow_pickle=allow_pickle, **from_pretrained_kwargs)
    craft(model, config or CraftConfig(), seed=seed, method=method)
    model._sparsecraft_base = source
    return model
