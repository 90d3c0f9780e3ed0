"""lm-eval bridge: sparsecraft models as an lm-eval model type, and one function that runs tasks on them.

Importing this module registers the model type `sparsecraft` with lm-eval:

    import sparsecraft.evaluate.lm_eval_bridge                    # registers "sparsecraft"
    lm_eval.simple_evaluate(model="sparsecraft", model_args="pretrained=runs/pesc/model,dtype=bfloat16", ...)

`SparsecraftLM` is lm-eval's own `HFLM` around a model that `sparsecraft.load` gives (crafted, trained, dense,
GGUF, built-in name, imported Camelidae/Sparsetral layouts) or around a model object already in memory, so
log-likelihood batching, truncation and caching are lm-eval's code, not ours. Generation requests are answered
by the serving engine's continuous batching (`engine_generation`), with lm-eval's own stop-sequence handling and
truncation rules; `generation="hf"` (or an option the engine lacks) leaves them to lm-eval's `generate` batches.
lm-eval calls the model without labels, so no router loss is added: the scores come from the logits alone.

`run_lm_eval` resolves task names and suites, builds every task before the model is loaded (an unknown name,
a hub task with no hub, or code execution without permission fail in a second, with one line), sets per-task
few-shot counts, and calls `lm_eval.simple_evaluate`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

try:
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as exc:  # the [eval] extra is optional
    raise ConfigError(f'lm-eval is not installed ({exc.name or exc} is missing): pip install "sparsecraft[eval]"') \
        from exc

import torch
from tqdm import tqdm

from . import humaneval
from .engine_generation import Prompt, engine_can_drive, engine_can_run, generate_all, request_seed
from .suites import TaskRequest, parse_tasks
from .tasks import LOCAL_TASKS, is_local_task, task_config

MODEL_TYPE = "sparsecraft"
GENERATION_PATHS = ("engine", "hf")
AUTO_ENGINE_BATCH = 32  # rows decoded together when the batch size is "auto" (continuous batching needs a number)


@register_model(MODEL_TYPE)
class SparsecraftLM(HFLM):
    """lm-eval's HF causal-LM wrapper around a sparsecraft-loaded model.

    Args:
        pretrained: a path / built-in name for `sparsecraft.load`, or a model object (used as it is: its device
            and dtype are kept). Anything with `.config`, `.device`, `__call__(ids) -> .logits` and `.generate`
            works, which is how tests plug in scripted models.
        tokenizer: a tokenizer object or directory; default: the one stored with the model or its base
            (`sparsecraft.generation.load_tokenizer_for`). Required with a model object.
        dtype, device, allow_pickle: passed to `sparsecraft.load` when `pretrained` is a path.
        generation: "engine" (default) answers generation requests through the serving engine's continuous
            batching (`engine_generation`), "hf" through lm-eval's own batched `model.generate`.
        batch_size, max_length and any other keyword: lm-eval's `HFLM` options.
    """

    def __init__(self, pretrained: Any, tokenizer: Any = None, dtype: Any = None, device: str | None = None,
                 allow_pickle: bool = False, batch_size: int | str = 1, max_length: int | None = None,
                 generation: str = "engine", **kwargs: Any) -> None:
        if generation not in GENERATION_PATHS:
            raise ConfigError(f"generation must be one of {', '.join(GENERATION_PATHS)}, got {generation!r}")
        self.generation = generation
        from ..generation import load_tokenizer_for
        from ..loading import load

        self.sparsecraft_path = None
        if isinstance(pretrained, (str, os.PathLike)):
            self.sparsecraft_path = str(pretrained)
            model = load(pretrained, dtype=None if dtype in (None, "auto") else dtype, device=device,
                         allow_pickle=_flag(allow_pickle))
            if tokenizer is None:
                tokenizer = load_tokenizer_for(pretrained, model)
        else:
            model = pretrained
        if tokenizer is None:
            raise ConfigError("SparsecraftLM: a model object needs its tokenizer (tokenizer=...)")
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        kwargs.pop("backend", None)
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                         max_length=max_length, **kwargs)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """lm-eval's generation requests: through the engine when the model is a transformers model and every
        request's options allow it (and `generation="engine"`), else through lm-eval's `HFLM.generate_until`."""
        if (self.generation != "engine" or not engine_can_drive(self.model) or isinstance(self.think_end_token, int)
                or not requests):
            return super().generate_until(requests, disable_tqdm)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        base_seed = torch.initial_seed()  # simple_evaluate seeds torch before it asks for answers
        prompts, stops = [], []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if not engine_can_run(kwargs):
                return super().generate_until(requests, disable_tqdm)
            ids, _ = self.tok_batch_encode([context], left_truncate_len=self.max_length - max_gen_toks,
                                           truncation=self.truncation)
            sampled = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0.0) > 0
            prompts.append(Prompt(ids=ids[0].tolist(), max_tokens=max_gen_toks, stop=until,
                                  temperature=float(kwargs["temperature"]) if sampled else 0.0,
                                  top_p=float(kwargs.get("top_p") or 1.0), seed=request_seed(base_seed, index)))
            stops.append(until)
        batch = self.batch_size if isinstance(self.batch_size, int) else AUTO_ENGINE_BATCH
        with tqdm(total=len(prompts), disable=disable_tqdm or self.rank != 0,
                  desc="Generating (continuous batching)") as bar:
            texts = generate_all(self.model, self.tokenizer, prompts, max_batch_size=batch,
                                 on_done=lambda _: bar.update(1))
        think = self.think_end_token if isinstance(self.think_end_token, str) else None
        answers = []
        for request, text, until in zip(requests, texts, stops, strict=True):
            answer = postprocess_generated_text(generation=text, stop=until, think_end_token=think)
            self.cache_hook.add_partial("generate_until", request.args, answer)
            answers.append(answer)
        return answers

    def get_model_info(self) -> dict:
        """Parameters, dtype, path and sparsecraft method; never asks the hub (HFLM's version looks up a SHA)."""
        from ..checkpoint.crafted import method_of

        model = self._model
        params = sum(p.numel() for p in model.parameters()) if hasattr(model, "parameters") else -1
        return {"model_num_parameters": params, "model_dtype": str(getattr(model, "dtype", "")),
                "model_path": self.sparsecraft_path, "sparsecraft_method": _safe(method_of, model)}


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


def _safe(fn, *args) -> Any:
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - informational only (e.g. a scripted test model)
        return None


# ------------------------------------------------------------------------------------------------ tasks


@functools.lru_cache(maxsize=2)
def task_manager(include_defaults: bool):
    """lm-eval's task index, built once per process: indexing its ~14k built-in tasks takes seconds, so only
    when a task outside the bundled ones is asked for."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=include_defaults)


@dataclass
class PreparedTasks:
    """Built lm-eval task objects (groups kept whole), the names asked for, and the task manager."""

    objects: list = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    leaves: dict = field(default_factory=dict)  # leaf task name -> Task
    task_manager: Any = None
    notes: list[str] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)  # task -> why (a suite's task whose data is unreachable)


def _hub_error(name: str, exc: Exception) -> ConfigError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ConfigError(
        f"task {name!r} needs its data from the Hugging Face hub, which cannot be reached here ({first}); run "
        "where the hub is reachable (or the datasets cache holds it), or use the bundled offline tasks "
        "(sparsecraft eval --list-tasks)")


def prepare_tasks(requests: list[TaskRequest], *, num_fewshot: int | None = None,
                  allow_code_execution: bool = False) -> PreparedTasks:
    """Build every requested task now (this reads their data), with its few-shot count.

    `num_fewshot` (the global `--num-fewshot`) applies to every task except those whose config pins 0-shot
    (lm-eval's rule); a per-request count (`name:N` or a suite's setting) always applies.
    """
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    manager = task_manager(include_defaults=any(not is_local_task(r.name) for r in requests))
    prepared = PreparedTasks(task_manager=manager)
    for request in requests:
        local = is_local_task(request.name)
        spec = task_config(request.name) if local else request.name
        try:
            loaded = manager.load([spec])
        except KeyError:
            raise ConfigError(f"unknown task {request.name!r}: not a bundled task ({', '.join(LOCAL_TASKS)}), "
                              "a suite (paper, local, code) or an lm-eval task") from None
        except Exception as exc:  # datasets/hub errors come in many types: one line for the user
            if local:
                raise
            if request.from_suite:  # the suite runs what it can; this one is reported, not dropped
                prepared.not_run[request.name] = str(_hub_error(request.name, exc))
                continue
            raise _hub_error(request.name, exc) from exc
        groups, tasks = loaded["groups"], loaded["tasks"]
        prepared.objects += [groups[request.name]] if request.name in groups else list(tasks.values())
        prepared.names.append(request.name)
        for name, task in tasks.items():
            if request.num_fewshot is not None:
                task.set_config(key="num_fewshot", value=request.num_fewshot)
            elif num_fewshot is not None:
                if task.get_config("num_fewshot") == 0:
                    prepared.notes.append(f"{name} is a 0-shot task; --num-fewshot left it at 0")
                else:
                    task.set_config(key="num_fewshot", value=num_fewshot)
            if getattr(task, "UNSAFE_CODE", False) and not allow_code_execution:
                raise humaneval.CodeExecutionRefused(humaneval.refusal_message(request.name))
            prepared.leaves[name] = task
    return prepared


@contextlib.contextmanager
def _code_execution(allowed: bool):
    """Our own switch, plus the one lm-eval's hub code tasks (HF `evaluate`'s code_eval) read."""
    previous = os.environ.get("HF_ALLOW_CODE_EVAL")
    if allowed:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"
    try:
        with humaneval.allow_code_execution(allowed):
            yield
    finally:
        if previous is None:
            os.environ.pop("HF_ALLOW_CODE_EVAL", None)
        else:
            os.environ["HF_ALLOW_CODE_EVAL"] = previous


def run_lm_eval(
    model: Any,
    tasks: str | list[str] | PreparedTasks,
    *,
    tokenizer: Any = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int | str = 1,
    device: str | None = None,
    dtype: Any = None,
    allow_pickle: bool = False,
    allow_code_execution: bool = False,
    max_length: int | None = None,
    seed: int = 0,
    log_samples: bool = False,
    apply_chat_template: bool = False,
    generation: str = "engine",
) -> tuple[dict[str, Any], PreparedTasks]:
    """Evaluate a model (path, model object or an lm-eval `LM`) on tasks; returns (lm-eval's output, tasks).

    `tasks`: a comma list / list of task names, `name:N` and suite names (see `suites.py`), or the result of
    `prepare_tasks`. `limit`: examples per task (a fraction when below 1), as lm-eval's `--limit`.
    `apply_chat_template`: prompts go through the tokenizer's chat template (few-shot examples as earlier
    turns), as lm-eval's `--apply_chat_template --fewshot_as_multiturn`; for instruction-tuned models.
    `generation`: "engine" (continuous batching) or "hf" (lm-eval's `model.generate` batches); see SparsecraftLM.
    """
    from lm_eval.evaluator import simple_evaluate

    prepared = tasks if isinstance(tasks, PreparedTasks) else prepare_tasks(
        parse_tasks(tasks), num_fewshot=num_fewshot, allow_code_execution=allow_code_execution)
    if not prepared.objects:  # every task a suite asked for was out of reach: nothing to run, all reported
        return {"results": {}}, prepared
    if isinstance(model, LM):
        lm = model
    else:
        lm = SparsecraftLM(model, tokenizer=tokenizer, dtype=dtype, device=device, allow_pickle=allow_pickle,
                           batch_size=batch_size, max_length=max_length, generation=generation)
    with _code_execution(allow_code_execution):
        raw = simple_evaluate(
            model=lm, tasks=prepared.objects, task_manager=prepared.task_manager, limit=limit,
            bootstrap_iters=1000, log_samples=log_samples, confirm_run_unsafe_code=allow_code_execution,
            apply_chat_template=apply_chat_template, fewshot_as_multiturn=apply_chat_template,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    if raw is None:  # not the main process of a multi-process run
        return {}, prepared
    return raw, prepared


def lm_eval_version() -> str:
    return getattr(lm_eval, "__version__", "unknown")
