"""What keeps a training run honest: one writer per output directory, no run silently mixed into another, a
resumed run that is the same run, and a diverged run that says so instead of saving NaNs as a success."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch

from ..errors import ConfigError
from ..yaml_settings import flatten

LOCK_NAME = ".lock"
# what a run leaves in its output directory; their presence means the directory holds a run
RUN_FILES = ("model", "metrics.jsonl", "summary.json", "recipe.json", "checkpoints", "tensorboard")
# recipe fields a resumed run may change freely: they do not alter the trajectory of the weights
RESUME_FREE = ("logging.", "checkpoint.", "train.eval_every", "train.eval_batches",
               "output_dir", "push_to_hub", "push_private", "allow_pickle")
# fields `--apply-changes` can apply for real from the resumed step on (the optimizer's settings; the run's
# length, over which the learning-rate schedule is then laid from the resumed step on)
APPLICABLE = ("optim.lr", "optim.weight_decay", "optim.betas", "optim.eps", "optim.max_grad_norm", "train.max_steps")


class OutputLock:
    """An exclusive lock on a run's output directory: `OUTPUT/.lock` holds the owner's PID, created with
    O_EXCL. A lock whose process is gone is stale and taken over. Only the main process of a run holds it."""

    def __init__(self, output: Path) -> None:
        self.path = Path(output) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read_pid(self.path)
                if owner is not None and owner != os.getpid() and _alive(owner):
                    raise ConfigError(f"{self.path.parent} is in use by another training run (PID {owner}); wait "
                                      "for it to finish or choose another output_dir") from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self.held = True
            return
        raise ConfigError(f"could not lock {self.path.parent}: another run keeps taking it")

    def release(self) -> None:
        if self.held and _read_pid(self.path) == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_output_dir(output: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a path that is a file, and a directory that already holds a run unless resuming or overwriting
    (then its run files are removed, under the lock)."""
    from ..atomic import check_output_path

    check_output_path(output)
    if resume or not output.is_dir():
        return
    present = [name for name in RUN_FILES if (output / name).exists()]
    if present and not overwrite:
        raise ConfigError(f"{output} already holds a run ({', '.join(present)}): pass --resume to continue it, "
                          "--overwrite to replace it, or choose another output_dir")
    for name in present:
        target = output / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def recipe_changes(saved: dict, current: dict) -> list[str]:
    """Recipe fields that differ between a checkpoint's recipe and this run's, except those free to change."""
    a, b = flatten(saved), flatten(current)
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and not k.startswith(RESUME_FREE))
    if _length_free(a) and _length_free(b):  # a constant lr without warmup: the length changes nothing before it
        changed = [k for k in changed if k != "train.max_steps"]
    return changed


def _length_free(flat: dict) -> bool:
    """Whether the learning-rate schedule is the same whatever the run's length (constant, no warmup)."""
    return flat.get("optim.schedule") == "constant" and not flat.get("optim.warmup_ratio")


def check_resume(saved: dict | None, current: dict, *, apply_changes: bool) -> list[str]:
    """The changed fields to apply on resume (only with `apply_changes`, only optimizer settings); one-line
    ConfigError for any other change, since the resumed run would no longer continue the same trajectory."""
    if saved is None:
        return []
    changed = recipe_changes(saved, current)
    if not changed:
        return []
    if not apply_changes:
        raise ConfigError(f"the recipe changed since the checkpoint ({', '.join(changed)}): resuming would not "
                          "continue the same run; pass --apply-changes to change the optimizer settings from here "
                          "on, or start a new output_dir")
    fixed = [k for k in changed if not k.startswith(APPLICABLE)]
    if fixed:
        raise ConfigError(f"{', '.join(fixed)} cannot change on resume (the model, the data or the batches would "
                          "differ from the checkpoint's); start a new output_dir")
    return changed


def apply_optimizer_settings(optimizer, scheduler, optim) -> None:
    """Make a resumed optimizer and schedule follow the recipe's lr, betas, eps and weight decay from here on."""
    for group in optimizer.param_groups:
        group.update(betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay, initial_lr=optim.lr)
    scheduler.base_lrs = [optim.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["lr"] = optim.lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


class DivergenceGuard:
    """Skips optimizer steps whose loss or gradient norm is not finite (as mixed-precision loss scalers do),
    counts them, and stops the run with a clear error after `limit` in a row."""

    def __init__(self, limit: int = 5) -> None:
        self.limit = limit
        self.in_a_row = 0
        self.skipped = 0

    def step_is_finite(self, loss: float, grad_norm: float | None, step: int) -> bool:
        finite = math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        if self.in_a_row >= self.limit:
            raise ConfigError(f"training diverged: {self.in_a_row} steps in a row (the last at step {step}) had a "
                              f"non-finite loss or gradient norm; lower optim.lr or check the data. Nothing was "
                              "saved as a trained model")
        return False


def check_finite(params: dict[str, torch.Tensor]) -> None:
    """Refuse to save a model whose trainable weights are not all finite."""
    bad = next((name for name, p in params.items() if not bool(torch.isfinite(p.detach()).all())), None)
    if bad is not None:
        raise ConfigError(f"training produced non-finite weights ({bad}); the model was not saved")
