"""Quick evaluation without lm-eval: held-out LM loss and perplexity per source dataset.

The numbers are the training loop's own held-out metric (`train.loop.evaluate`: the token-mean cross-entropy
of the assistant answers, prompts masked, through `sparsecraft.data`'s chat-template tokenisation), so a quick
eval of a trained model reproduces the `eval_loss` it logged when template and max_length are the same.

Which data:
- by default the bundled held-out split (`data/quickstart/heldout/`), named as in configs/quickstart.yaml
  (math, code, general), the same for every model, so runs compare;
- files given by the user (any layout `sparsecraft.data` reads; the source name is the file stem, or
  `NAME=PATH`);
- a training recipe's `data.eval_sources`, with its template and max_length: a YAML recipe, or a trained model
  directory (the recipe stored in its config.json).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import DataSource, PaddingCollator, load_source, tokenize_records
from ..data.collate import pad_id_of
from ..data.tokenize import IGNORE_INDEX
from ..errors import ConfigError

# the bundled held-out files and their source names, as configs/quickstart.yaml has them
BUNDLED_HELDOUT = (("math.jsonl", "math"), ("code.jsonl", "code"), ("general.jsonl", "general"),
                   ("alpaca.jsonl", "general"))
_SOURCE_TREE = Path(__file__).resolve().parents[3]  # the checkout (src/sparsecraft/evaluate → repo)


@dataclass
class QuickSettings:
    """What to evaluate and how to tokenise it (the recipe's `data` fields of the same names)."""

    sources: list[DataSource]
    template: str = "auto"
    max_length: int = 1024  # the longest bundled record is ~250 tokens with SmolLM2's tokenizer: nothing is cut
    truncation: str = "right"
    origin: str = "bundled held-out split"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"data": [{"path": s.path, "name": s.display_name} for s in self.sources],
                "template": self.template if self.template in ("auto", "tokenizer", "camelidae", "chatml")
                else "custom", "max_length": self.max_length, "truncation": self.truncation,
                "origin": self.origin}


class _OneProcess:
    """The part of `accelerate.Accelerator` that `train.loop.evaluate` uses, for one process on one device
    (no process group, no autocast: the model runs in the dtype it was loaded in)."""

    process_index, num_processes = 0, 1

    def __init__(self, device: torch.device):
        self.device = device

    def unwrap_model(self, model):
        return model

    def autocast(self):
        return contextlib.nullcontext()


def bundled_heldout_dir() -> Path:
    """`data/quickstart/heldout`, from the working directory or the source checkout."""
    for root in (Path.cwd(), _SOURCE_TREE):
        folder = root / "data" / "quickstart" / "heldout"
        if folder.is_dir():
            return folder
    raise ConfigError("the bundled held-out files (data/quickstart/heldout/) are not here: they ship with the "
                      "source tree; run from a checkout or pass --data FILE ...")


def default_settings() -> QuickSettings:
    folder = bundled_heldout_dir()
    return QuickSettings([DataSource(path=str(folder / f), name=n) for f, n in BUNDLED_HELDOUT])


def parse_data_args(items: list[str]) -> QuickSettings:
    """`--data` values: a YAML recipe or a trained model directory (the recipe's eval_sources), or data files
    as `PATH` or `NAME=PATH`."""
    if len(items) == 1 and items[0].endswith((".yaml", ".yml")):
        return settings_from_recipe_file(items[0])
    if len(items) == 1 and Path(items[0]).is_dir():
        found = settings_from_model_dir(items[0])
        if found is None:
            raise ConfigError(f"--data: {items[0]} is a folder without a training recipe in its config.json "
                              "(give data files, a YAML recipe or a trained model directory)")
        return found
    sources = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or os.path.exists(item):
            name, path = None, item
        if not Path(path).is_file():
            raise ConfigError(f"--data: no such file: {path}")
        sources.append(DataSource(path=path, name=name or None))
    if not sources:
        raise ConfigError("--data: name at least one file")
    return QuickSettings(sources, origin="--data files")


def _from_data_section(data: dict, origin: str, base_dir: str | Path | None = None) -> QuickSettings:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the recipe has no data section")
    raw = data.get("eval_sources") or []
    if isinstance(raw, (str, dict)):
        raw = [raw]
    if not raw:
        raise ConfigError(f"{origin}: the recipe names no data.eval_sources (its held-out split is a fraction "
                          "of the training files); pass --data FILE ...")
    sources = [DataSource.from_dict(s, f"data.eval_sources[{i}]", base_dir) for i, s in enumerate(raw)]
    missing = [s.path for s in sources if not Path(s.path).is_file()]
    if missing:
        raise ConfigError(f"{origin}: eval source {missing[0]} not found (paths are relative to where training "
                          "ran); pass --data FILE ...")
    return QuickSettings(sources, template=data.get("template", "auto"), max_length=data.get("max_length", 512),
                         truncation=data.get("truncation", "right"), origin=origin)


def settings_from_recipe_file(path: str | os.PathLike) -> QuickSettings:
    from ..yaml_settings import read_yaml

    path = Path(path)
    recipe = read_yaml(path, "recipe")
    return _from_data_section(recipe.get("data"), f"recipe {path}")


def settings_from_model_dir(path: str | os.PathLike) -> QuickSettings | None:
    """The eval sources of the recipe stored in a trained model's config.json, if it has usable ones."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    try:
        recipe = json.loads(config_path.read_text()).get("recipe")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("data"), dict):
        return None
    return _from_data_section(recipe["data"], f"the training recipe in {config_path}")


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return torch.device(device) if device is not None else next(model.parameters()).device


def quick_eval(model, tokenizer, settings: QuickSettings | None = None, *, batch_size: int = 4,
               limit: int | float | None = None) -> dict[str, Any]:
    """Held-out loss per source: `{"sources": {name: {"loss", "perplexity", "tokens", "samples"}}, "loss",
    "perplexity", "tokens", "samples", "dropped"}`; losses are token means over the answer tokens. `limit`: the
    first records of each source, a count, or a fraction of each below 1 (as lm-eval's `--limit`)."""
    from datasets import Dataset

    from ..train.loop import evaluate

    settings = settings or default_settings()
    if batch_size <= 0:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    records = []
    for source in settings.sources:
        rows, _ = load_source(source, split="eval")
        if limit is not None:
            rows = rows[:int(limit) if limit >= 1 else math.ceil(len(rows) * limit)]
        records += rows
    dataset, dropped = tokenize_records(Dataset.from_list(records), tokenizer, settings.template,
                                        settings.max_length, settings.truncation)
    if len(dataset) == 0:
        raise ConfigError(f"quick eval: no sample has an answer token left (dropped: {dict(dropped)})")
    losses = evaluate(model, dataset, PaddingCollator(pad_id_of(tokenizer)), batch_size,
                      _OneProcess(_model_device(model)))
    tokens, samples = Counter(), Counter()
    for labels, source in zip(dataset["labels"], dataset["source"]):
        n = sum(1 for x in labels[1:] if x != IGNORE_INDEX)  # a label on the first token is never predicted
        tokens[source] += n
        samples[source] += 1
    sources = {name: _row(losses[f"eval_loss/{name}"], tokens[name], samples[name]) for name in sorted(tokens)}
    overall = _row(losses["eval_loss"], sum(tokens.values()), len(dataset))
    return {"sources": sources, **overall, "dropped": dict(dropped)}


def _row(loss: float, tokens: int, samples: int) -> dict[str, Any]:
    if loss is None or not math.isfinite(loss):  # e.g. fp16 overflow: JSON has no NaN, report no number
        return {"loss": None, "perplexity": None, "tokens": tokens, "samples": samples}
    try:
        perplexity = math.exp(loss)
    except OverflowError:
        perplexity = None
    return {"loss": loss, "perplexity": perplexity, "tokens": tokens, "samples": samples}
