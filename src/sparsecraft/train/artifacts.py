"""What a training run leaves behind: the trained model in sparsecraft's format, and a merged standalone export."""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint.card import write_model_card
from ..checkpoint.crafted import save_crafted
from ..errors import CheckpointError
from ..surgery import is_crafted


def save_trained(built, out_dir: str | os.PathLike, recipe, summary: dict | None = None,
                 full_state: dict | None = None) -> Path:
    """Save a trained model: base reference + router/adapters (or upcycled experts) + the LoRA adapter, with a
    model card (`summary`: the run's held-out results); then upload it when the recipe says `push_to_hub`.

    The base weights are frozen during training, so referring to the base is exact; `sparsecraft export`
    writes a standalone copy with LoRA merged.
    """
    lora_model = built.model if recipe.lora.enabled else None
    out = save_crafted(built.inner, out_dir, base=built.source, tokenizer=built.tokenizer, lora_model=lora_model,
                       extra={"recipe": recipe.to_dict()}, summary=summary,
                       card_name=recipe.push_to_hub or Path(recipe.output_dir).name, full_state=full_state)
    if recipe.push_to_hub:
        from ..checkpoint.push import push_to_hub

        url = push_to_hub(out, recipe.push_to_hub, private=recipe.push_private)
        print(f"pushed {out} to {recipe.push_to_hub}: {url}")
    return out


def export_merged(path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype=None,
                  allow_pickle: bool = False) -> Path:
    """Load a trained model (LoRA merged into de-quantised base weights) and write it standalone.

    Crafted models become a standalone sparsecraft directory; dense ones a plain transformers directory.
    """
    from ..atomic import atomic_directory, check_output_path
    from ..generation import load_tokenizer_for
    from ..loading import load

    out_dir = check_output_path(out_dir, empty=True)  # before the (long) load
    model = load(path, dtype=dtype, allow_pickle=allow_pickle)
    try:
        tokenizer = load_tokenizer_for(path, model)
    except CheckpointError:
        tokenizer = None
    if is_crafted(model):
        return save_crafted(model, out_dir, standalone=True, tokenizer=tokenizer)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        base = getattr(model, "_sparsecraft_base", None)
        origin = None if base is None else {"spec": base.spec, "revision": base.revision}
        write_model_card(tmp, {"method": "dense", "recipe": _saved_recipe(path)}, standalone=True,
                         name=out_dir.name, base=origin)
    return out_dir


def _saved_recipe(path: str | os.PathLike) -> dict | None:
    """The training recipe a sparsecraft directory's config.json holds, if any."""
    from ..checkpoint.crafted import is_crafted_dir, read_config

    return read_config(path).get("recipe") if is_crafted_dir(path) else None
