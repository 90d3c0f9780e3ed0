"""Grouping runs into experiments: runs whose recipes differ only in `train.seed` form one `Group` (UpIT
post-training runs: whose pipeline configs differ only in their seeds).

Groups are ordered by method (the registry's order, `methods.method_order`) and, where one method has several
groups, labelled by the recipe settings that tell them apart.

    groups = group_runs(load_runs(["runs/pesc-s0", "runs/pesc-s1", "runs/dense"]))
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..methods import method_order
from ..yaml_settings import flatten
from .run_dirs import Run

# recipe fields that do not make two runs different experiments
_NOT_THE_EXPERIMENT = ("output_dir", "train.seed", "logging", "checkpoint")
# an UpIT pipeline's seeds besides train.seed
_NOT_THE_PIPELINE = (*_NOT_THE_EXPERIMENT, "expand.seed", "route.seed")
# where an UpIT post-training run reads its own pipeline's experts and router: paths that differ with every
# pipeline run, so the pipeline's config tells the experiments apart instead
_PIPELINE_ARTEFACTS = ("upit.experts", "upit.router")


_SEED_PART = re.compile(r"(?:[-_.]|(?<![^/]))(?:s|seed)[-_]?\d+(?=$|/)")  # `-s0`, `_seed1`, `/s2`


def _without(flat: dict, prefixes: tuple[str, ...]) -> dict:
    return {k: v for k, v in flat.items() if not any(k == x or k.startswith(x + ".") for x in prefixes)}


def _experiment(run: Run) -> dict:
    """The settings that make `run` the experiment it is: its recipe but for seeds and output settings, and
    for an UpIT post-training run its pipeline's config in place of the paths to that pipeline's artefacts."""
    exp = _without(flatten(run.recipe or {}), _NOT_THE_EXPERIMENT)
    if run.pipeline is not None:
        exp = _without(exp, _PIPELINE_ARTEFACTS)
        exp.update({f"pipeline.{k}": v for k, v in _without(flatten(run.pipeline), _NOT_THE_PIPELINE).items()})
    return exp


def _short(value):
    """A long path as its last two parts (`…/argmin-expand/expand`): labels stay readable and machine-free."""
    if isinstance(value, str) and "/" in value and len(value) > 32:
        return "…/" + "/".join(value.rstrip("/").split("/")[-2:])
    return value


@dataclass
class Group:
    """Runs of one experiment (same recipe but for the seed)."""

    label: str
    method: str
    runs: list[Run]

    def values(self, get: Callable[[Run], float | None]) -> list[float]:
        return [v for v in (get(r) for r in self.runs) if v is not None]


def seedless_name(name: str) -> str:
    """A run's name without its seed part: `camel-s2` -> `camel`, `upit-s0/upcycle` -> `upit/upcycle`."""
    return _SEED_PART.sub("", name).replace("//", "/").strip("/") or name


def group_runs(runs: list[Run]) -> list[Group]:
    """Runs with equal recipes except for `train.seed` (and output/logging/checkpoint settings) share a group.
    Groups of one method are labelled by their runs' common name without the seed (`dense (camel)`) where that
    tells them apart, else by the settings that do."""
    groups: dict[str, list[Run]] = {}
    experiments: dict[str, dict] = {}
    for run in runs:
        if run.recipe is None:
            key = f"{run.method}|{run.name}"
            experiments[key] = {}
        else:
            exp = _experiment(run)
            key = json.dumps(exp, sort_keys=True)
            experiments[key] = exp
        groups.setdefault(key, []).append(run)
    stems = {key: {seedless_name(r.name) for r in members} for key, members in groups.items()}
    out = []
    for key, members in groups.items():
        method = members[0].method
        label = method
        rivals = [k for k, m in groups.items() if m[0].method == method and k != key]
        if rivals and len(stems[key]) == 1 and all(stems[r] != stems[key] for r in rivals):
            label = f"{method} ({next(iter(stems[key]))})"  # the name the runs were given, seed left out
        elif rivals:
            mine = experiments[key]
            differing = sorted({k for r in rivals for k in set(mine) | set(experiments[r])
                                if mine.get(k) != experiments[r].get(k) and k != "method"})
            if mine:
                shown = [f"{k}={_short(json.loads(mine[k])) if k in mine else '-'}" for k in differing[:3]]
                label = f"{method} ({', '.join(shown)}{', ...' if len(differing) > 3 else ''})" if shown else method
            else:
                label = f"{method} ({members[0].name})"
        members = sorted(members, key=lambda r: (r.seed is None, r.seed or 0, r.name))
        out.append(Group(label, method, members))
    out.sort(key=lambda g: (method_order(g.method), g.label))
    return out
