"""The four UpIT stages in order, each runnable alone and resumable from what it left on disk.

    OUTPUT/upit.json            the resolved config of the last invocation
    OUTPUT/prepare/             the dense run (checkpoints/, model/, summary.json) and experts/ (an ExpertSet)
    OUTPUT/expand/              the expanded ExpertSet + similarity.json + lineage.json
    OUTPUT/route/               buckets.json, router.safetensors, accuracy.json
    OUTPUT/upcycle/             an ordinary sparsecraft training run of method `upit` (summary.json, model/, ...)
    OUTPUT/summary.json         one entry per finished stage

A stage is finished when its last artifact exists. Without `resume`, a stage whose folder already holds
anything is refused (so a changed config never silently reuses old results); with it, finished stages are
skipped and an interrupted training stage continues from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from ..atomic import atomic_write_json
from ..errors import ConfigError
from ..methods.expert_set import ROUTER_NAME, load_expert_set, save_expert_set
from .config import STAGES, UpitConfig, stage_recipe
from .prepare import EXPERTS_SUBDIR, run_prepare
from .route import EXPERTS_SUBDIR as ROUTE_EXPERTS
from .route import route_done, run_route

SIMILARITY_NAME = "similarity.json"


def stage_done(cfg: UpitConfig, stage: str) -> bool:
    d = cfg.stage_dir(stage)
    if stage == "prepare":
        return (d / EXPERTS_SUBDIR / "experts.json").is_file()
    if stage == "expand":
        return (d / "experts.json").is_file() and (d / SIMILARITY_NAME).is_file()
    if stage == "route":
        return route_done(cfg)
    return (d / "summary.json").is_file()


def _has_output(cfg: UpitConfig, stage: str) -> bool:
    d = cfg.stage_dir(stage)
    return d.is_dir() and any(d.iterdir())


def _write_json(path: Path, data) -> None:
    atomic_write_json(path, data, default=str)


def _record(cfg: UpitConfig, stage: str, result: dict) -> None:
    path = cfg.out / "summary.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[stage] = result
    _write_json(path, data)


# ------------------------------------------------------------------------------------------------------ stages


def _expansion_settings(cfg: UpitConfig) -> dict:
    e = cfg.expand
    return {"enabled": e.enabled, "merge": e.merge, "parents": e.parents, "p": e.p, "seed": e.seed,
            "lora_merge": e.lora_merge}


def run_expand(cfg: UpitConfig) -> dict:
    """Stage 2: m -> n experts (`expand.expand`), written with its similarity and lineage report. With
    `expand.enabled: false` the prepared experts pass unchanged (there must be n of them)."""
    from .expand import expand, write_expansion_report
    from .merge import similarity_matrix

    es = load_expert_set(cfg.stage_dir("prepare") / EXPERTS_SUBDIR)
    n, m = cfg.num_experts, len(es.states)
    if n < m:
        raise ConfigError(f"craft.num_experts (n={n}) is below the {m} prepared experts; raise it or choose fewer")
    e = cfg.expand
    if not e.enabled and n != m:
        raise ConfigError(f"expand.enabled=false but {cfg.stage_dir('prepare') / EXPERTS_SUBDIR} holds {m} experts, "
                          f"not n={n}")
    out = cfg.stage_dir("expand")
    if n > m:
        grown = expand(es, n, p=e.p, seed=e.seed, lora_merge=e.lora_merge, merge=e.merge, parents=e.parents)
        before, after = grown.meta["similarity_before"], grown.meta["similarity_after"]
        lineage = grown.meta["lineage"]
    else:  # nothing to grow: the prepared experts as they are
        meta = {**es.meta, "expansion": {**_expansion_settings(cfg), "from": m, "to": n}}
        grown = dataclasses.replace(es, meta=meta)
        before = after = similarity_matrix(es.states, es.base).tolist()
        lineage = []
    save_expert_set(grown, out)
    write_expansion_report(out, before, after, lineage, names=list(grown.names), settings=_expansion_settings(cfg))
    how = f"{e.merge} merges of {e.parents} parents" if n > m else \
        ("expansion disabled: the prepared checkpoints as they are" if not e.enabled else "nothing to grow")
    print(f"expand: {m} -> {n} experts ({', '.join(grown.names)}), {how} -> {out}")
    return {"from": m, "to": n, "names": list(grown.names), "children": len(lineage), "enabled": e.enabled,
            "merge": e.merge if n > m else None, "parents": e.parents if n > m else None}


def run_upcycle(cfg: UpitConfig, *, resume: bool = False) -> dict:
    """Stage 4: the MoE of the expanded experts + pre-trained router, post-trained by `train.loop.run`."""
    from ..train.checkpoints import latest_checkpoint
    from ..train.loop import run

    experts_dir = cfg.stage_dir("expand").resolve()
    if cfg.route.enabled and not cfg.route.freeze_experts:  # the experts trained with the router
        experts_dir = (cfg.stage_dir("route") / ROUTE_EXPERTS).resolve()
    es = load_expert_set(experts_dir)
    out = cfg.stage_dir("upcycle")
    router = cfg.stage_dir("route") / ROUTER_NAME
    upit = {"experts": str(experts_dir), "router": str(router.resolve()) if cfg.route_stage else ""}
    # es.shared (averaged non-expert weights) is loaded by build_moe and saved beside the model by save_crafted
    recipe = stage_recipe(cfg, "upcycle", upit=upit)
    kind = "pre-trained" if cfg.route.enabled else "random (route.init=random)" if cfg.route_stage else "default"
    print(f"upcycle: {len(es.states)} {es.kind} experts, top-{recipe.craft_config().top_k}, {kind} router -> {out}")
    return run(recipe, resume=resume and latest_checkpoint(out) is not None)


def _run_stage(cfg: UpitConfig, stage: str, resume: bool) -> dict:
    if stage == "prepare":
        es = run_prepare(cfg, resume=resume)
        return {"experts": len(es.states), "names": list(es.names), "kind": es.kind}
    if stage == "expand":
        return run_expand(cfg)
    if stage == "route":
        return run_route(cfg, load_expert_set(cfg.stage_dir("expand")), resume=resume)
    return run_upcycle(cfg, resume=resume)


_NEEDS = {"expand": "prepare", "route": "expand", "upcycle": "expand"}


def run_pipeline(cfg: UpitConfig, stage: str = "all", *, resume: bool = False) -> dict:
    """Run one stage or all four; returns `{stage: result}` for the stages run (or skipped: `{"skipped": true}`)."""
    if stage != "all" and stage not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)} or all; got {stage!r}")
    todo = STAGES if stage == "all" else (stage,)
    if stage == "route" and not cfg.route_stage:
        raise ConfigError("route.enabled is false: there is no route stage to run")
    for s in todo:  # refuse before any work is done
        if not resume and _has_output(cfg, s) and not (s == "route" and not cfg.route_stage):
            state = "a finished" if stage_done(cfg, s) else "an unfinished"
            raise ConfigError(f"{cfg.stage_dir(s)} holds {state} {s} stage: pass --resume to keep it, or use "
                              "another output_dir")
    cfg.out.mkdir(parents=True, exist_ok=True)
    _write_json(cfg.out / "upit.json", cfg.to_dict())
    results: dict = {}
    for s in todo:
        label = f"[upit {STAGES.index(s) + 1}/4 {s}]"
        if s == "route" and not cfg.route_stage:
            print(f"{label} skipped: route.enabled is false (the router keeps its default init)")
            results[s] = {"skipped": True, "router": "default init (route.enabled=false, route.init=default)"}
            _record(cfg, s, results[s])
            continue
        if resume and stage_done(cfg, s):
            print(f"{label} done already in {cfg.stage_dir(s)}; skipped")
            results[s] = {"skipped": True}
            continue
        need = _NEEDS.get(s)
        if need and not stage_done(cfg, need):
            raise ConfigError(f"stage {s} needs the {need} stage's results in {cfg.stage_dir(need)}: run "
                              f"--stage {need} first")
        if s == "upcycle" and cfg.route_stage and not stage_done(cfg, "route"):
            raise ConfigError(f"stage upcycle needs the pre-trained router in {cfg.stage_dir('route')}: run "
                              "--stage route first (or set route.enabled=false)")
        print(f"{label} starting")
        t0 = time.perf_counter()
        result = _run_stage(cfg, s, resume)
        result = {**result, "seconds": round(time.perf_counter() - t0, 1)}
        _record(cfg, s, result)
        results[s] = result
        print(f"{label} finished in {result['seconds']:.0f} s")
    return results

