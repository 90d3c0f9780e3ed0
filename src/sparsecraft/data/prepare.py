"""`prepare_data`: the whole pipeline, config + tokenizer → tokenised (optionally packed) splits + collator; a
streaming config's train split is a `TokenStream` (tokenised on the fly) instead."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from datasets import Dataset, load_from_disk

from .collate import PackingCollator, PaddingCollator, pad_id_of
from .config import DataConfig, DataError
from .load import load_data
from .pack import pack_dataset
from .report import DataReport
from .stream import RecordStream, TokenStream
from .templates import resolve_template
from .tokenize import token_stats, tokenize_fingerprint, tokenize_records


@dataclass
class PreparedData:
    """Tokenised splits (`input_ids`, `labels`, and `source` or, packed, `position_ids` and `num_samples`), the
    collator that batches them, and the report. Streaming: `train` is an endless `TokenStream` of samples."""

    train: Dataset | TokenStream
    eval: Dataset | None
    collator: Callable
    report: DataReport


def _tokenised(records: Dataset, tokenizer, config: DataConfig, split: str, report: DataReport,
               cache_dir: str | Path | None) -> Dataset:
    cached = None
    if cache_dir is not None:  # keyed by content: records, tokenizer, template, length, truncation, packing
        key = tokenize_fingerprint(records, tokenizer, resolve_template(tokenizer, config.template),
                                   config.max_length, config.truncation)
        cached = Path(cache_dir) / f"{split}-{key}{'-packed' if config.packing else ''}"
        if (cached / "sparsecraft_stats.json").is_file():
            stats = json.loads((cached / "sparsecraft_stats.json").read_text())
            report.dropped[split], report.tokens[split] = Counter(stats["dropped"]), stats["tokens"]
            return load_from_disk(str(cached / "data"))
    ds, dropped = tokenize_records(records, tokenizer, config.template, config.max_length, config.truncation)
    report.dropped[split] = dropped
    if len(ds) == 0:
        raise DataError(f"data: no {split} sample has a trained token left after tokenisation "
                        f"(max_length={config.max_length}; dropped: {dict(dropped)})")
    report.tokens[split] = token_stats(ds)
    if config.packing:
        ds = pack_dataset(ds, config.max_length)
        report.tokens[split]["rows"] = len(ds)
    if cached is not None:
        partial = cached.with_name(cached.name + ".partial")  # written whole, then renamed: no half caches
        shutil.rmtree(partial, ignore_errors=True)
        ds.save_to_disk(str(partial / "data"))
        stats = {"dropped": dropped, "tokens": report.tokens[split]}
        (partial / "sparsecraft_stats.json").write_text(json.dumps(stats))
        try:
            partial.rename(cached)
        except OSError:  # another run wrote the same cache meanwhile: use theirs
            shutil.rmtree(partial, ignore_errors=True)
        ds = load_from_disk(str(cached / "data"))
    return ds


def prepare_data(config: DataConfig, tokenizer, loaded: tuple | None = None,
                 cache_dir: str | Path | None = None) -> PreparedData:
    """Load and validate records, tokenise with prompt masking, pack if asked.

    `loaded`: the result of an earlier `load_data(config)` (call it before loading the model to fail fast on
    bad data, then pass it here). `cache_dir`: keep tokenised splits on disk, reused when nothing changed (not
    for a stream, which is tokenised as it is read).
    """
    train_records, eval_records, report = loaded if loaded is not None else load_data(config)
    if isinstance(train_records, RecordStream):
        train: Dataset | TokenStream = TokenStream(train_records, tokenizer, config)
    else:
        train = _tokenised(train_records, tokenizer, config, "train", report, cache_dir)
    evaluation = (_tokenised(eval_records, tokenizer, config, "eval", report, cache_dir)
                  if eval_records is not None else None)
    pad = pad_id_of(tokenizer)
    collator = PackingCollator(pad) if config.packing else PaddingCollator(pad)
    return PreparedData(train, evaluation, collator, report)
