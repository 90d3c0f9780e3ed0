"""UpIT stage 1, the dense run: one instruction-tuning run with a checkpoint every `prepare.interval` of an epoch.

Its recipe is `config.stage_recipe(cfg, "prepare")` (see `prepare.py` for what each kind trains). Every
checkpoint is kept and the run's final state counts too: these saved states are the candidates, m of which
(`prepare.select`) become experts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .config import UpitConfig, stage_recipe


@dataclass
class Candidate:
    """A saved state of the dense run: a checkpoint (`OUT/checkpoints/step-N`) or the final model (`OUT/model`)."""

    step: int
    path: Path
    final: bool = False

    @property
    def name(self) -> str:
        return f"step{self.step}"


def checkpoint_interval(recipe, interval: float) -> tuple[int, int]:
    """(checkpoint.every in optimizer steps, total steps) for a checkpoint every `interval` epochs.

    Counted on the loaded records with one process (what `sparsecraft upit` runs); samples dropped later by
    tokenisation can make the real epoch a little shorter.
    """
    from ..data import DataConfig, load_records
    from ..train.batches import BatchPlan

    data = DataConfig.from_dict(recipe.data)
    if data.packing:
        # packed rows are fewer than records, so an interval counted in records would be several times too long
        raise ConfigError("prepare: data.packing is not supported in the dense stage (checkpoint intervals are "
                          "counted in records); set data.packing=false")
    train, _, _ = load_records(data)
    plan = BatchPlan(len(train), recipe.train.batch_size, 1, 0, recipe.train.grad_accum, recipe.train.seed)
    if plan.steps_per_epoch == 0:
        raise ConfigError(f"{len(train)} training records cannot fill one optimizer step of "
                          f"{recipe.train.batch_size * recipe.train.grad_accum}; lower train.batch_size")
    every = max(1, round(interval * plan.steps_per_epoch))
    return every, plan.total_steps(recipe.train.epochs, recipe.train.max_steps)


def run_dense(cfg: UpitConfig, *, resume: bool = False) -> Path:
    """Train the dense stage (skipped when `prepare/summary.json` exists); returns its output directory."""
    from ..train.checkpoints import latest_checkpoint
    from ..train.loop import run

    recipe = stage_recipe(cfg, "prepare")
    every, total = checkpoint_interval(recipe, cfg.prepare.interval)
    recipe.checkpoint.every = every
    available = len(range(every, total, every)) + 1  # the loop saves no checkpoint at the last step: the model
    needed = max(cfg.prepare.select) if isinstance(cfg.prepare.select, list) else None
    if available < cfg.prepare.num_experts:
        raise ConfigError(f"the dense stage saves {available} states ({total} steps, a checkpoint every {every}); "
                          f"prepare.num_experts={cfg.prepare.num_experts} needs more: lower prepare.interval or "
                          "train longer")
    if needed is not None and needed > total:
        raise ConfigError(f"prepare.select names step {needed} but the dense stage runs {total} steps")
    out = Path(recipe.output_dir)
    if (out / "summary.json").is_file():
        print(f"prepare: dense stage already trained in {out}")
        return out
    print(f"prepare: dense stage (method {recipe.method}), {total} steps, a checkpoint every {every} steps")
    run(recipe, resume=resume and latest_checkpoint(out) is not None)
    return out


def candidates(out: Path) -> list[Candidate]:
    """The dense run's saved states, oldest first: its checkpoints, then its final model."""
    from ..train.checkpoints import list_checkpoints

    found = [Candidate(json.loads((c / "state.json").read_text())["step"], c) for c in list_checkpoints(out)]
    summary = out / "summary.json"
    if summary.is_file():
        found.append(Candidate(int(json.loads(summary.read_text())["steps"]), out / "model", final=True))
    return found


def select(found: list[Candidate], m: int, how) -> list[Candidate]:
    """m of the candidates: `even` (evenly spaced, ending at the last), `last`, or a list of steps."""
    if isinstance(how, list):
        by_step = {c.step: c for c in found}
        missing = [s for s in how if s not in by_step]
        if missing:
            raise ConfigError(f"prepare.select: no saved state at step {missing[0]} "
                              f"(saved: {', '.join(str(c.step) for c in found)})")
        return [by_step[s] for s in how]
    if len(found) < m:
        raise ConfigError(f"prepare: {len(found)} saved states, fewer than prepare.num_experts={m}")
    if how == "last":
        return found[-m:]
    count = len(found)
    return [found[math.ceil((j + 1) * count / m) - 1] for j in range(m)]
