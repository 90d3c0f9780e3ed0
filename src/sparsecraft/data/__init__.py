"""Instruction data: record formats → conversations → tokens with prompt masks → batches (padded or packed).

Sources are local files (JSON, JSON Lines, Parquet, CSV, Arrow), local folders (data files or `save_to_disk`) or
hub dataset IDs (read from huggingface_hub's cache, offline too); docs/data.md has the whole recipe.

    config = DataConfig.from_dict({"sources": [{"path": "Open-Orca/SlimOrca", "weight": 2}, "metamath.json"],
                                   "eval_fraction": 0.02, "max_length": 2048, "packing": True})
    train_records, eval_records, report = load_records(config)      # no tokenizer: fails fast on bad data
    prepared = prepare_data(config, tokenizer)                     # PreparedData(train, eval, collator, report)
    # with `"streaming": True`: load_data(config) opens the sources; prepared.train is an endless TokenStream
    print(prepared.report.format())
"""

from .collate import PackingCollator, PaddingCollator, split_batch
from .config import DataConfig, DataError, DataSource
from .formats import REASONS, BadRecord, detect_format, normalise
from .known import KNOWN_SETS
from .load import load_data, load_records, load_source, open_stream
from .pack import pack_dataset
from .prepare import PreparedData, prepare_data
from .read import OpenedSource
from .report import DataReport, SourceReport
from .stream import RecordStream, TokenStream
from .templates import CAMELIDAE_TEMPLATE, CHATML_TEMPLATE, resolve_template
from .tokenize import IGNORE_INDEX, encode_conversation, tokenize_records

__all__ = [
    "DataSource", "DataConfig", "DataError", "DataReport", "SourceReport", "PreparedData",
    "load_records", "load_source", "tokenize_records", "prepare_data", "detect_format", "normalise",
    "encode_conversation", "pack_dataset", "PaddingCollator", "PackingCollator", "split_batch",
    "resolve_template", "CAMELIDAE_TEMPLATE", "CHATML_TEMPLATE", "IGNORE_INDEX", "REASONS", "BadRecord",
    "KNOWN_SETS", "OpenedSource", "load_data", "open_stream", "RecordStream", "TokenStream",
]
