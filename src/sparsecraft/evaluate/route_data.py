"""What to route: data files and saved-model settings, read and tokenised as in training, then routed.

Turns command-line data items (`name=path.jsonl`, a path, or a recipe YAML) into `DataSource`s, reads what a
saved model directory says about its method and training data, tokenises and batches the records exactly as
training does, and runs `route_collect.collect_routing` over them.

    stats = routing_stats(model, tokenizer, data_sources(["math=heldout/math.jsonl", "code.jsonl"]))
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from .route_collect import collect_routing, routed_blocks
from .route_stats import RoutingStats

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from ..data import DataSource

RECIPE_SUFFIXES = (".yaml", ".yml")


def data_sources(items: Sequence[str]) -> list[DataSource]:
    """`DataSource`s from command-line items: `name=path.jsonl`, a path (name: the file's stem), or a recipe
    YAML (its `data.eval_sources`, else its `data.sources`)."""
    from ..data import DataConfig, DataSource
    from ..train.recipe import load_recipe

    sources = []
    for item in items:
        name, path = None, item
        head, sep, tail = item.partition("=")
        if sep and head and "/" not in head and os.sep not in head and not Path(item).exists():
            name, path = head, tail
        if not path:
            raise ConfigError(f"data item {item!r}: expected NAME=PATH or PATH")
        if path.endswith(RECIPE_SUFFIXES):
            if name is not None:
                raise ConfigError(f"data item {item!r}: a recipe names its own sources; give it without NAME=")
            data = DataConfig.from_dict(load_recipe(path).data)
            sources += data.eval_sources or data.sources
            continue
        if not Path(path).is_file():
            raise ConfigError(f"data file not found: {path}")
        sources.append(DataSource(path=path, name=name))
    if not sources:
        raise ConfigError("no data to route: give at least one NAME=PATH.jsonl (or a recipe YAML)")
    return sources


def _saved_config(model_dir: str | os.PathLike) -> dict:
    config = Path(model_dir) / "config.json"
    try:
        data = json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def saved_method(model_dir: str | os.PathLike) -> str | None:
    """The registered method a sparsecraft directory's config.json names (`pesc`, `dense`, ...); None for anything
    else."""
    method = _saved_config(model_dir).get("method")
    return method if isinstance(method, str) else None


def saved_recipe_data(model_dir: str | os.PathLike) -> dict | None:
    """The `data` section of the recipe a trained model was saved with (its config.json), if any."""
    recipe = _saved_config(model_dir).get("recipe")
    data = recipe.get("data") if isinstance(recipe, dict) else None
    return data if isinstance(data, dict) and data.get("sources") else None


def tokenise_sources(sources: Sequence[DataSource], tokenizer: PreTrainedTokenizerBase, template: str = "auto",
                     max_length: int = 512, max_records: int | None = None,
                     truncation: str = "right") -> tuple[Dataset, list[str], list[int], dict]:
    """Read and tokenise each source exactly as training does (same formats, template, masking, truncation).

    Returns `(dataset with input_ids/labels/source, source names in order, records kept per name, dropped
    counts)`. `max_records`: the first N usable records of each file.
    """
    from datasets import Dataset

    from ..data import load_source, tokenize_records

    if max_records is not None and max_records <= 0:
        raise ConfigError(f"--max-records must be positive, got {max_records}")
    rows, names = [], []
    for source in sources:
        records, _ = load_source(source, split="eval")
        records = records[:max_records] if max_records else records
        rows += records
        if source.display_name not in names:
            names.append(source.display_name)
    dataset, dropped = tokenize_records(Dataset.from_list(rows), tokenizer, template, max_length, truncation)
    if len(dataset) == 0:
        raise ConfigError(f"no record left after tokenisation (dropped: {dict(dropped)})")
    kept = Counter(dataset["source"])
    return dataset, names, [kept.get(n, 0) for n in names], dict(dropped)


def _batches(dataset: Dataset, names: list[str], pad_id: int, batch_size: int) -> list[dict]:
    """Padded batches, samples sorted by length (less padding; the statistics do not depend on order): dicts of
    `input_ids [B, T]`, `attention_mask [B, T]` and `source_ids [B]` (indices into `names`)."""
    from ..data import PaddingCollator

    collator = PaddingCollator(pad_id)
    index = {n: i for i, n in enumerate(names)}
    lengths = [len(ids) for ids in dataset["input_ids"]]
    order = sorted(range(len(dataset)), key=lambda i: (lengths[i], i))
    batches = []
    for start in range(0, len(order), batch_size):
        samples = [dataset[i] for i in order[start:start + batch_size]]
        batch = collator(samples)
        batches.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                        "source_ids": torch.tensor([index[s["source"]] for s in samples])})
    return batches


def routing_stats(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, sources: Sequence[DataSource], *,
                  max_records: int | None = 200, batch_size: int = 8, max_length: int = 512,
                  template: str = "auto", truncation: str = "right", progress: bool = False) -> RoutingStats:
    """Routing statistics of `model` over data files (`DataSource`s, e.g. from `data_sources`), tokenised as in
    training; each file's records count towards its source name."""
    from ..data.collate import pad_id_of

    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    if max_length < 2:
        raise ConfigError(f"--max-length must be at least 2, got {max_length}")
    routed_blocks(model)  # a dense model fails before any data is read
    dataset, names, kept, dropped = tokenise_sources(sources, tokenizer, template, max_length, max_records,
                                                     truncation)
    batches = _batches(dataset, names, pad_id_of(tokenizer), batch_size)
    stats = collect_routing(model, batches, names, progress=progress, total=len(batches))
    stats.source_records = kept
    stats.dropped = dropped
    return stats
