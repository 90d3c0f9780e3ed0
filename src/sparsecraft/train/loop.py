"""The training run a recipe describes, top to bottom: data -> model -> optimizer -> steps -> checkpoints -> model.

Multi-process: run it under `accelerate launch` or `torchrun`; accelerate wraps the model for DDP (or FSDP /
DeepSpeed from an accelerate config). Each rank reads its own slice of every global batch (see batches.py); a
streamed train split (`data.streaming`) runs `train.max_steps` steps and saves its position in every checkpoint.
The LM loss is normalised by the number of target tokens in the whole global step, so any split of a global
batch over processes and accumulation steps gives the same gradient as one process taking it at once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..atomic import check_output_path
from ..errors import ConfigError
from ..generation import context_length
from ..methods import get_method
from ..moe.balance import selection_biases, update_router_biases
from ..moe.compiled import compile_moe_blocks, compile_note
from ..report import trainable_by_part
from .batches import BatchPlan, StreamBatches
from .checkpoints import STREAM_KEY, latest_checkpoint, load_checkpoint, save_checkpoint, saved_recipe, stream_position
from .engine_checkpoint import load_engine_state, save_engine_state
from .guards import DivergenceGuard, OutputLock, apply_optimizer_settings, check_finite, check_output_dir, check_resume
from .heap import install_heap_trims
from .metrics import MetricsLog, expert_load, load_imbalance, progress_bar, truncate_after
from .nll import row_nll
from .optim import make_optimizer
from .recipe import Recipe
from .setup import build_model, trainable_parameters
from .sharding import one_dispatch_path, prepare_for_engine


@dataclass
class StepStats:
    lm_loss: float
    aux_loss: float | None
    z_loss: float | None
    tokens: int
    counts: torch.Tensor | None


def _scheduler(recipe: Recipe, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[recipe.optim.schedule]
    warmup = math.ceil(recipe.optim.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _model_inputs(batch: dict) -> dict:
    # no KV cache in training: transformers only detects packed samples (position_ids resets) without one
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels", "position_ids")}
    return {**inputs, "use_cache": False}


def count_targets(batch: dict) -> int:
    """Positions the shifted LM loss scores: labels[:, 1:] != -100."""
    return int((batch["labels"][:, 1:] != -100).sum())


def train_step(model, batches: list[dict], accelerator, craft_cfg, recorder=None) -> StepStats:
    """Forward/backward over one optimizer step's micro-batches (gradients accumulate; no optimizer step).
    `recorder`: the crafted model's routing recorder, told that a new optimizer step begins."""
    local_targets = sum(count_targets(b) for b in batches)
    global_targets = accelerator.reduce(torch.tensor(local_targets, device=accelerator.device), "sum").item()
    # DDP averages gradients over ranks, so each rank divides by global/world: the result is the global mean
    num_items = max(global_targets, 1) / accelerator.num_processes
    accum = len(batches)
    lm_sum, aux_sum, z_sum, tokens, counts = 0.0, 0.0, 0.0, 0, None
    if recorder is not None:
        recorder.new_step()  # global balance: the step's expert counts start again
    for j, batch in enumerate(batches):
        sync = contextlib.nullcontext() if j == accum - 1 else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            out = model(**_model_inputs(batch), num_items_in_batch=num_items)
            router = 0.0
            if getattr(out, "aux_loss", None) is not None:
                router = craft_cfg.aux_loss_coef * out.aux_loss + craft_cfg.z_loss_coef * out.router_z_loss
            # out.loss adds the router terms once per micro-step; average them over the accumulation instead
            loss = out.loss - router * (1 - 1 / accum)
        accelerator.backward(loss)
        lm_sum += float((out.loss - router).detach()) * num_items
        if getattr(out, "aux_loss", None) is not None:
            aux_sum += float(out.aux_loss.detach()) / accum
            z_sum += float(out.router_z_loss.detach()) / accum
            c = out.expert_counts.detach().cpu()
            counts = c if counts is None else counts + c
        tokens += int(batch["num_tokens"]) if "num_tokens" in batch else int(batch["attention_mask"].sum())
    totals = accelerator.reduce(torch.tensor([lm_sum, aux_sum, z_sum, tokens], device=accelerator.device,
                                             dtype=torch.float64), "sum")
    has_router = counts is not None
    return StepStats(
        lm_loss=float(totals[0]) / max(global_targets, 1),
        # under multi-process training each rank's value is scaled by the world size; the mean is the global loss
        aux_loss=float(totals[1]) / accelerator.num_processes if has_router else None,
        z_loss=float(totals[2]) / accelerator.num_processes if has_router else None,
        tokens=int(totals[3]),
        counts=counts,
    )


@torch.no_grad()
def evaluate(model, dataset, collator, batch_size: int, accelerator, max_batches: int = 0) -> dict:
    """Held-out LM loss (token mean) overall and per source, sharded over ranks."""
    if dataset is None or len(dataset) == 0:
        return {}
    # the unwrapped model: a DDP forward may broadcast buffers, and ranks with no eval batch would not join
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = {}
    indices = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    if max_batches:
        batches = batches[:max_batches]
    for idx in batches:
        samples = [dataset[i] for i in idx]
        batch = _to_device(collator(samples), accelerator.device)
        with accelerator.autocast():
            logits = model(**{k: v for k, v in _model_inputs(batch).items() if k != "labels"}).logits
        row_loss, row_count = row_nll(logits, batch["labels"])  # [B], [B]
        for sample, loss, n in zip(samples, row_loss.tolist(), row_count.tolist()):
            for key in ("all", sample.get("source", "all")):
                acc = sums.setdefault(key, [0.0, 0.0])
                acc[0] += loss
                acc[1] += n
    keys = sorted(sums)
    gathered = accelerator.gather_for_metrics([(k, sums[k]) for k in keys], use_gather_object=True) \
        if accelerator.num_processes > 1 else [(k, sums[k]) for k in keys]
    merged: dict[str, list[float]] = {}
    for key, (s, n) in gathered:
        acc = merged.setdefault(key, [0.0, 0.0])
        acc[0] += s
        acc[1] += n
    model.train(was_training)
    return {f"eval_loss/{k}" if k != "all" else "eval_loss": v[0] / max(v[1], 1) for k, v in merged.items()}


def reset_peak_memory(device: torch.device) -> None:
    """Start peak-memory accounting for the training phase (model loading peaks are not training memory)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since `reset_peak_memory`: CUDA `max_memory_allocated`, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def run(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, apply_changes: bool = False) -> dict:
    """Train as the recipe says; returns the run summary (also written to OUTPUT/summary.json).

    The output directory is locked for the run (one writer); a directory holding another run is refused unless
    `resume` (continue it: the recipe must be the checkpoint's, or with `apply_changes` differ only in optimizer
    settings, which then apply from the resumed step) or `overwrite` (replace it)."""
    output = Path(recipe.output_dir)
    # the main process of a run (torchrun / accelerate launch set RANK) takes the lock, before any process group
    lock = OutputLock(output) if int(os.environ.get("RANK", "0")) == 0 else None
    if lock is not None:
        check_output_path(output)  # a file where the directory goes: refused before the lock writes into it
        lock.acquire()
    try:
        if lock is not None:
            check_output_dir(output, resume=resume, overwrite=overwrite)
        return _run(recipe, resume=resume, apply_changes=apply_changes)
    finally:
        if lock is not None:
            lock.release()


def _run(recipe: Recipe, *, resume: bool, apply_changes: bool) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from ..data import DataConfig, PaddingCollator, load_data, prepare_data, resolve_template
    from ..data.collate import pad_id_of
    from ..memory import logical_numel
    from .artifacts import save_trained

    handlers = []
    if get_method(recipe.method).experts_may_idle:
        # e.g. upcycled FFNs of unusual structure run as a loop over expert copies: a routed expert no token
        # chose on a rank takes no part in that step's graph
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=handlers)
    main = accelerator.is_main_process
    output = Path(recipe.output_dir)
    last = latest_checkpoint(output) if resume else None
    if resume and last is None and main:
        print(f"no complete checkpoint in {output}/checkpoints; starting from scratch")
    if not resume and latest_checkpoint(output) is not None:
        raise ConfigError(f"{output} already holds checkpoints: pass --resume to continue, or another output_dir")
    changes = check_resume(saved_recipe(last, output), recipe.to_dict(), apply_changes=apply_changes) \
        if last is not None else []

    data_cfg = DataConfig.from_dict(recipe.data)
    streamed = data_cfg.streams
    if streamed and recipe.train.max_steps <= 0:
        raise ConfigError("data.streaming needs train.max_steps: a stream has no length to count epochs in")
    loaded = load_data(data_cfg)  # unusable data is an error before any model is loaded
    set_seed(recipe.train.seed)
    built = build_model(recipe, device=accelerator.device)
    if recipe.train.compile:
        note = compile_note(compile_moe_blocks(built.inner))
        if note and main:
            print(note)
    if recipe.train.trim_heap and accelerator.device.type == "cpu":  # GPUs: the CUDA caching allocator's memory
        installed = install_heap_trims(built.inner)
        if not installed and main:
            print("note: train.trim_heap needs glibc's malloc_trim, which this C library lacks; not trimming")
    context = context_length(built.inner)
    if context is not None and data_cfg.max_length > context:
        if main:
            print(f"note: data.max_length {data_cfg.max_length} capped to the model's context of {context} tokens")
        data_cfg.max_length = context
    prepared = prepare_data(data_cfg, built.tokenizer, loaded=loaded)
    # generation must prompt the way training formatted the data
    built.tokenizer.chat_template = resolve_template(built.tokenizer, data_cfg.template)
    eval_collator = PaddingCollator(pad_id_of(built.tokenizer))  # per-sample losses need unpacked rows
    if main:
        print(prepared.report.format())
    craft_cfg = built.inner._sparsecraft_config if hasattr(built.inner, "_sparsecraft_config") else None
    if craft_cfg is not None:
        # the load-balancing loss sees the global micro-batch, as one process would
        built.inner._sparsecraft_recorder.sync_across_processes = accelerator.num_processes > 1
        if accelerator.num_processes > 1:
            fixed = one_dispatch_path(built.inner, recipe.train.batch_size * data_cfg.max_length)
            if fixed and main:
                print(f"note: dispatch {fixed} on every process (ZeRO reduces gradients in backward order)")

    params = trainable_parameters(built.model)
    parts = trainable_by_part(built.model)  # before any engine wraps or shards the parameters
    optimizer = make_optimizer(recipe.optim, params.values(), accelerator.device)
    engine = prepare_for_engine(accelerator, built.inner)
    if engine is not None:
        # FSDP / DeepSpeed own the optimizer; prepared together (accelerate runs them on GPUs only)
        model, optimizer = accelerator.prepare(built.model, optimizer)
    else:
        model = accelerator.prepare_model(built.model)  # DDP (or nothing on one process)
    plan, feed = None, None
    if streamed:
        feed = StreamBatches(prepared.train, recipe.train.batch_size, accelerator.num_processes,
                             accelerator.process_index, recipe.train.grad_accum)
        total_steps = recipe.train.max_steps
    else:
        plan = BatchPlan(len(prepared.train), recipe.train.batch_size, accelerator.num_processes,
                         accelerator.process_index, recipe.train.grad_accum, recipe.train.seed)
        if plan.micro_steps_per_epoch == 0:
            raise ConfigError(f"{len(prepared.train)} training samples cannot fill one global batch of "
                              f"{plan.global_micro_batch}; lower train.batch_size")
        total_steps = plan.total_steps(recipe.train.epochs, recipe.train.max_steps)
    scheduler = _scheduler(recipe, optimizer, total_steps)
    # the selection biases of loss-free balancing move by rule after each step: checkpointed beside the weights
    # (buffers, whole on every rank under any engine)
    by_rule = selection_biases(built.inner)
    start, state = 0, {"tokens": 0, "seconds": 0.0}
    metrics = MetricsLog(output, enabled=main, tensorboard=recipe.logging.tensorboard)
    if last is not None:
        state = load_checkpoint(last, params, optimizer, scheduler, rank=accelerator.process_index,
                                world_size=accelerator.num_processes, engine=engine,
                                engine_load=partial(load_engine_state, engine, model, optimizer) if engine else None,
                                by_rule=by_rule)
        start = state["step"]
        if start >= total_steps:
            raise ConfigError(f"max_steps {total_steps} is not past the checkpoint's step {start}: nothing to train; "
                              "raise train.max_steps (with --apply-changes) or start a new output_dir")
        if changes:
            apply_optimizer_settings(optimizer, scheduler, recipe.optim)
            if main:
                print(f"resumed with changed {', '.join(changes)} (applied from step {start} on)")
        position = stream_position(state, last, streamed)
        if feed is not None:
            feed.load_state_dict(position)
        if main:
            truncate_after(metrics.path, start)
            print(f"resumed from {last} (step {start} of {total_steps})")
    if main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))

    reset_peak_memory(accelerator.device)
    initial_eval = state.get("initial_eval")
    if initial_eval is None:
        initial_eval = evaluate(model, prepared.eval, eval_collator, recipe.train.batch_size, accelerator,
                                recipe.train.eval_batches)
        if main and initial_eval:
            metrics.log({"step": 0, **initial_eval})
    model.train()
    bar = progress_bar(total_steps, start, enabled=main and recipe.logging.progress)
    tokens, seconds = state.get("tokens", 0), state.get("seconds", 0.0)
    first_loss = state.get("first_loss")
    last_stats = None
    guard = DivergenceGuard()
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        samples = (feed.rank_samples() if feed is not None
                   else [[prepared.train[i] for i in idx] for idx in plan.rank_indices(step)])
        batches = [_to_device(prepared.collator(micro), accelerator.device) for micro in samples]
        stats = train_step(model, batches, accelerator, craft_cfg, getattr(built.inner, "_sparsecraft_recorder", None))
        # the norm is always taken (an infinite max only measures it): a NaN or inf step is skipped, not applied
        max_norm = recipe.optim.max_grad_norm if recipe.optim.max_grad_norm > 0 else math.inf
        grad_norm = float(accelerator.clip_grad_norm_(list(params.values()), max_norm))
        lr = optimizer.param_groups[0]["lr"]  # this step's (the scheduler steps to the next one below)
        if guard.step_is_finite(stats.lm_loss, grad_norm, step + 1):
            optimizer.step()
            scheduler.step()
            if craft_cfg is not None and craft_cfg.bias_balance and stats.counts is not None:
                counts = accelerator.reduce(stats.counts.to(accelerator.device), "sum").cpu()
                update_router_biases(built.inner, counts, craft_cfg.bias_update_rate)
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        tokens += stats.tokens
        seconds += dt
        first_loss = stats.lm_loss if first_loss is None else first_loss
        last_stats = stats
        done = step + 1
        epoch = {"epoch": round(plan.epoch_of(done), 4)} if plan is not None else {}  # a stream has no epochs
        record = {"step": done, **epoch, "loss": stats.lm_loss, "lr": lr,
                  "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": stats.tokens / dt if dt > 0 else None}
        if stats.aux_loss is not None:
            record.update(aux_loss=stats.aux_loss, z_loss=stats.z_loss, load_imbalance=load_imbalance(stats.counts),
                          expert_load=expert_load(stats.counts))
        if recipe.train.eval_every and done % recipe.train.eval_every == 0 and done < total_steps:
            record.update(evaluate(model, prepared.eval, eval_collator, recipe.train.batch_size, accelerator,
                                   recipe.train.eval_batches))
        if done % recipe.logging.every == 0 or done == total_steps:
            metrics.log(record)
        bar.set_postfix(loss=f"{stats.lm_loss:.3f}", aux=f"{stats.aux_loss:.3f}" if stats.aux_loss else "-",
                        tok_s=f"{tokens / max(seconds, 1e-9):.0f}")
        bar.update(1)
        if recipe.checkpoint.every and done % recipe.checkpoint.every == 0 and done < total_steps:
            progress = {"tokens": tokens, "seconds": seconds, "first_loss": first_loss, "initial_eval": initial_eval,
                        "recipe": recipe.to_dict()}
            if feed is not None:
                progress[STREAM_KEY] = feed.state_dict()
            save_checkpoint(output, done, params, optimizer, scheduler, progress,
                            rank=accelerator.process_index, world_size=accelerator.num_processes,
                            barrier=accelerator.wait_for_everyone, keep=recipe.checkpoint.keep,
                            engine_save=partial(save_engine_state, engine, model, optimizer) if engine else None,
                            by_rule=by_rule)
    bar.close()
    final_eval = evaluate(model, prepared.eval, eval_collator, recipe.train.batch_size, accelerator,
                          recipe.train.eval_batches)
    summary = {
        "method": recipe.method, "steps": total_steps, "first_loss": first_loss,
        "final_loss": last_stats.lm_loss if last_stats else None, "tokens": tokens, "train_seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else None, **final_eval,
        **{f"initial_{k}": v for k, v in (initial_eval or {}).items()},
        "trainable_params": sum(p.numel() for p in params.values()), "trainable_by_part": parts,
        "total_params": sum(logical_numel(p) for p in built.model.parameters()),
        "peak_mem_bytes": peak_memory_bytes(accelerator.device),
        "precision": str(built.compute_dtype).removeprefix("torch."),
        "world_size": accelerator.num_processes, "skipped_steps": guard.skipped,
        **({STREAM_KEY: feed.state_dict()} if feed is not None else {}),
    }
    # sharded weights are gathered whole (every rank takes part) so rank 0 saves what one process would
    full_state = accelerator.get_state_dict(model) if engine is not None else None
    check_finite(full_state if full_state is not None else params)  # a diverged run is an error, never a success
    if main:
        metrics.log({"step": total_steps, **{k: v for k, v in final_eval.items()}})
        metrics.close()
        model_dir = save_trained(built, output / "model", recipe, summary, full_state)
        summary["model_dir"] = str(model_dir)
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary
