"""`sparsecraft eval MODEL [--tasks ...] [--quick]`: lm-eval benchmarks and held-out loss for any model.

    sparsecraft eval runs/quickstart/model                          # the bundled offline tasks (suite `local`)
    sparsecraft eval runs/quickstart/model --quick                  # held-out loss/perplexity, no lm-eval
    sparsecraft eval MODEL --tasks paper --batch-size auto          # the paper's benchmarks (needs the hub)
    sparsecraft eval MODEL --tasks sc_math_gen:5,sc_math_mc --limit 10 --out eval/
    sparsecraft eval --list-tasks

Results go to OUT/results.json + results.md (tasks) and OUT/quick.json + quick.md (--quick); OUT defaults to
RUN_DIR/eval for a trained model RUN_DIR/model, else eval/<model name>.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from ..errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: lm-eval tasks (offline bundled ones too) or held-out loss")
    p.add_argument("model", nargs="?", default=None, help="model directory, .gguf file or built-in name")
    p.add_argument("--tasks", default=None,
                   help="comma list of tasks (NAME or NAME:SHOTS) and suites: local (default), paper, code")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples for every task")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task (a fraction of each task when below 1), as lm-eval's --limit")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/eval or eval/<model name>)")
    p.add_argument("--batch-size", default="1", help="batch size, or 'auto' (lm-eval picks the largest that fits)")
    p.add_argument("--quick", action="store_true", help="held-out loss and perplexity per source (no lm-eval)")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="--quick data: files (PATH or NAME=PATH), a YAML recipe or a trained model directory "
                        "(the recipe's data.eval_sources); default: the bundled held-out split")
    p.add_argument("--list-tasks", action="store_true", help="print the bundled offline tasks, one per line")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="allow running model-generated code (HumanEval, MBPP), each program in a subprocess "
                        "with a timeout; not a sandbox")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="prompt through the tokenizer's chat template (few-shot examples as earlier turns)")
    p.add_argument("--generation", choices=("engine", "hf"), default="engine",
                   help="how generation tasks are answered: engine = continuous batching (finished answers leave "
                        "the batch, repeated prompts are prefilled once), hf = lm-eval's model.generate batches")
    p.add_argument("--log-samples", action="store_true",
                   help="also write every document's prompt, answers and metrics to OUT/samples/TASK.jsonl")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the model's)")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (can run code)")
    p.set_defaults(run=run)


def _limit(value: float | None) -> int | float | None:
    if value is None:
        return None
    if not value > 0:
        raise ConfigError(f"--limit must be positive, got {value:g}")
    if value >= 1:
        if value != int(value):
            raise ConfigError(f"--limit must be a whole number of examples, or a fraction below 1; got {value:g}")
        return int(value)
    return value


def _batch_size(value: str) -> int | str:
    if value == "auto" or value.startswith("auto:"):
        return value
    if not value.isdigit() or int(value) <= 0:
        raise ConfigError(f"--batch-size must be a positive integer or 'auto', got {value!r}")
    return int(value)


def default_out_dir(model: str) -> Path:
    """RUN_DIR/eval for RUN_DIR/model of a training run, else eval/<model name>."""
    path = Path(model)
    if path.is_dir() and any((path.parent / f).is_file() for f in ("summary.json", "recipe.json")):
        return path.parent / "eval"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name or str(model)).strip("._") or "model"
    return Path("eval") / name


def run(args) -> int:
    from ..evaluate.tasks import LOCAL_TASKS

    if args.list_tasks:
        print("\n".join(LOCAL_TASKS))
        return 0
    if not args.model:
        raise ConfigError("eval: give a MODEL (directory, .gguf file or built-in name), or --list-tasks")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.data and not args.quick:
        raise ConfigError("--data chooses the --quick evaluation's files; add --quick (lm-eval tasks name their "
                          "own data)")
    limit, batch_size = _limit(args.limit), _batch_size(args.batch_size)
    out = Path(args.out) if args.out else default_out_dir(args.model)
    run_tasks = args.tasks is not None or not args.quick

    prepared = quick_settings = None
    if run_tasks:  # build the tasks before loading the model: bad names, no hub, no permission fail fast
        from ..evaluate.lm_eval_bridge import prepare_tasks
        from ..evaluate.suites import parse_tasks

        prepared = prepare_tasks(parse_tasks(args.tasks if args.tasks is not None else "local"),
                                 num_fewshot=args.num_fewshot, allow_code_execution=args.allow_code_execution)
        for note in prepared.notes:
            print(f"note: {note}", file=sys.stderr)
    if args.quick:
        from ..evaluate.quick import default_settings, parse_data_args

        quick_settings = parse_data_args(args.data) if args.data else default_settings()

    model, tokenizer, device = _load(args)
    settings = {"device": str(device), "dtype": args.dtype, "batch_size": batch_size, "limit": limit,
                "generation": args.generation}
    if quick_settings is not None:
        from ..evaluate.quick import quick_eval
        from ..evaluate.results import QUICK_JSON, format_quick_table, write_quick

        quick_batch = batch_size if isinstance(batch_size, int) else 4  # no auto search for a loss pass
        quick = quick_eval(model, tokenizer, quick_settings, batch_size=quick_batch, limit=limit)
        data = {"model": args.model, **quick,
                "settings": {**settings, "batch_size": quick_batch, **quick_settings.to_dict()}}
        write_quick(out, args.model, quick, data["settings"])
        print(format_quick_table(data))
        print(f"wrote {out / QUICK_JSON}")
    if prepared is not None:
        from ..evaluate.lm_eval_bridge import lm_eval_version, run_lm_eval
        from ..evaluate.results import (
            format_results_table,
            summarize_lm_eval,
            write_results,
            write_samples,
        )
        from ..version import __version__

        raw, prepared = run_lm_eval(model, prepared, tokenizer=tokenizer, limit=limit, batch_size=batch_size,
                                    allow_code_execution=args.allow_code_execution,
                                    apply_chat_template=args.apply_chat_template, generation=args.generation,
                                    log_samples=args.log_samples)
        summary = summarize_lm_eval(raw, prepared.names)
        settings.update(lm_eval=lm_eval_version(), sparsecraft=__version__, tasks_requested=args.tasks or "local",
                        chat_template=args.apply_chat_template)
        path = write_results(out, args.model, summary, settings, raw, prepared.not_run)
        if args.log_samples:
            for written in write_samples(out, raw):
                print(f"wrote {written}")
        print(format_results_table({"model": args.model, "tasks": summary["tasks"], "not_run": prepared.not_run,
                                    "settings": {"num_fewshot": summary["num_fewshot"],
                                                 "samples": summary["samples"]}}))
        print(f"wrote {path}")
    return 0


def _load(args):
    import torch

    from ..generation import load_tokenizer_for
    from ..loading import load

    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    model = load(args.model, dtype=args.dtype, device=device, allow_pickle=args.allow_pickle)
    tokenizer = load_tokenizer_for(args.model, model)
    return model, tokenizer, device or "cpu"
