"""UpIT stage 3: seed data bucketed by expert perplexity, router rows pre-trained on the buckets.

1. Seed: a seeded sample of the training records, part of it held out (`buckets.seed_split`).
2. Buckets: every expert's perplexity on every seed record (`buckets.expert_nll`), then `assign.assign` by
   `route.bucketing` (default `balanced`: every expert gets its share of the records it is relatively best at);
   an expert without a training record is a warning.
3. Router pre-training on the MoE of all n experts, experts frozen by default (`router_pretrain.pretrain_router`:
   `lm_weight * L_lm + aux_weight * L_aux`).
4. Routing accuracy on the held-out seed records, before and after (`router_pretrain.routing_accuracy`).

With `route.enabled: false, route.init: random` (the random-router ablation) the stage only writes random router
rows (`random_router`) and an accuracy.json saying so.

This module runs the stage and holds its files: writes `route/buckets.json`, `route/router.safetensors`
(`layers.{i}.router: [E, h]`), `route/accuracy.json`, and with `freeze_experts: false` the experts as they
trained, `route/experts/` (post-training starts from them).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch

from ..atomic import atomic_write_json
from ..config import CraftConfig
from ..errors import ConfigError
from ..methods.expert_set import ROUTER_NAME, ExpertSet, router_rows, save_expert_set, save_router, states_from_moe
from ..methods.upit import build_moe
from .assign import assign
from .buckets import bucket_report, expert_nll, seed_data
from .config import RouteSettings, UpitConfig, stage_recipe
from .router_pretrain import pretrain_router, routing_accuracy

BUCKETS_NAME = "buckets.json"
ACCURACY_NAME = "accuracy.json"
EXPERTS_SUBDIR = "experts"  # only when the experts trained with the router (route.freeze_experts: false)


# ---------------------------------------------------------------------------------------------------- the stage


def _write_json(path: Path, data) -> None:
    atomic_write_json(path, data, indent=1)


def random_router(layers: list[int], num_experts: int, hidden: int, std: float, seed: int) -> dict[int, torch.Tensor]:
    """`{layer: [E, h]}` router rows drawn from N(0, std^2), layer by layer in increasing order, from one
    generator seeded with `seed`: the same for a seed whatever the training seed is."""
    gen = torch.Generator().manual_seed(seed)
    return {i: torch.randn(num_experts, hidden, generator=gen, dtype=torch.float32) * std for i in sorted(layers)}


def _hidden_size(cfg: UpitConfig) -> int:
    from ..sources import load_base_config, resolve_base
    from ..surgery import text_config

    return int(text_config(load_base_config(resolve_base(cfg.model))).hidden_size)


def _write_random_router(cfg: UpitConfig, es: ExpertSet) -> dict:
    """The random-router ablation: rows from `random_router`, no pre-training."""
    settings, out = cfg.route, cfg.stage_dir("route")
    out.mkdir(parents=True, exist_ok=True)
    rows = random_router(es.layers(), len(es.states), _hidden_size(cfg), settings.init_std, settings.seed)
    save_router(rows, out / ROUTER_NAME)
    result = {"pretrained": False, "init": "random", "init_std": settings.init_std, "seed": settings.seed,
              "layers": sorted(rows), "heldout_records": 0, "record_accuracy": None,
              "settings": dataclasses.asdict(settings)}
    _write_json(out / ACCURACY_NAME, result)
    print(f"route: random router rows (N(0, {settings.init_std}^2), seed {settings.seed}), no pre-training "
          f"-> {out / ROUTER_NAME}")
    return result


def stored_nll(path: Path, indices: list[int], names: list[str]) -> torch.Tensor | None:
    """`[E, S]` NLLs stored in an earlier buckets.json of the same seed records and experts, else None."""
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    records = old.get("records", [])
    # NLLs of another seed split or expert set belong to other records / experts; files before "nll" lack them
    if [r["index"] for r in records] != indices or old.get("experts") != names or not all("nll" in r
                                                                                          for r in records):
        print(f"route: {path} is from another seed split or expert set; recomputing the perplexities")
        return None
    print(f"route: reusing the perplexities in {path}")
    return torch.tensor([r["nll"] for r in records], dtype=torch.float64).T.reshape(len(names), len(records))


def make_buckets(nll: torch.Tensor, n_train: int, settings: RouteSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(buckets [S], normalised scores or None)` of `nll [E, S]` (training part first, `n_train` records),
    the two parts assigned apart; `random` draws with `route.seed + 1` (training) and `+ 2` (held-out), apart
    from the seed split's own draw."""
    return assign(nll, settings.bucketing, settings.normalise, settings.seed + 1,
                  parts=(n_train, nll.shape[1] - n_train), min_share=settings.min_share)


def run_route(cfg: UpitConfig, es: ExpertSet, *, resume: bool = False) -> dict:
    """Stage 3 (see the module docstring). Reuses the perplexities of `buckets.json` when resuming. Returns
    accuracy.json's data."""
    from ..sources import load_base_model, resolve_base

    settings = cfg.route
    if not settings.enabled:
        return _write_random_router(cfg, es)
    out = cfg.stage_dir("route")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    post = stage_recipe(cfg, "upcycle")
    craft, progress = CraftConfig.from_dict(post.craft), post.logging.progress
    if craft.num_experts != len(es.states):
        raise ConfigError(f"craft.num_experts is {craft.num_experts} but the expert set holds {len(es.states)}")
    collator, train_ds, held_ds, train_idx, held_idx, sources = seed_data(cfg)
    if not train_idx:
        raise ConfigError("route: the seed holds no record to pre-train the router on; raise route.seed_min")
    seed_ds = train_ds + held_ds
    base = load_base_model(resolve_base(cfg.model), dtype=torch.float32, allow_pickle=post.allow_pickle)
    buckets_path = out / BUCKETS_NAME
    nll = stored_nll(buckets_path, train_idx + held_idx, list(es.names)) if resume else None
    if nll is None:
        print(f"route: {len(train_idx)} + {len(held_idx)} held-out seed records, {len(es.states)} experts")
        nll = expert_nll(base, es, craft, seed_ds, collator, settings.batch_size, settings.tokens, device, progress)
    buckets, scores = make_buckets(nll, len(train_idx), settings)
    report = bucket_report(nll, buckets, scores, sources, train_idx, held_idx, list(es.names), settings)
    _write_json(buckets_path, report)
    print(f"route: {settings.bucketing} buckets, training records per expert "
          f"{dict(zip(report['experts'], report['train_sizes']))} (lowest perplexity alone would give "
          f"{report['argmin_sizes']})")
    if report["empty"]:
        few = f" (only {len(train_idx)} training seed records for {len(es.states)} experts: raise route.seed_min)" \
            if len(train_idx) < len(es.states) and settings.bucketing != "argmin" else ""
        warnings.warn(f"route: no training seed record is in the bucket of expert(s) {', '.join(report['empty'])}; "
                      f"their router rows learn from negatives only{few}", stacklevel=2)
    model = build_moe(base, es, craft, seed=settings.seed).to(device)
    n_train = len(train_idx)
    train_buckets, held_buckets = buckets[:n_train], buckets[n_train:]
    before = routing_accuracy(model, held_ds, collator, held_buckets, settings.batch_size, settings.tokens, device) \
        if held_idx else {}
    history = pretrain_router(model, train_ds, collator, train_buckets, settings, device, progress)
    after = routing_accuracy(model, held_ds, collator, held_buckets, settings.batch_size, settings.tokens, device) \
        if held_idx else {}
    if not settings.freeze_experts:  # the experts trained too: post-training starts from these states
        save_expert_set(dataclasses.replace(es, states=states_from_moe(model, es)), out / EXPERTS_SUBDIR)
    save_router(router_rows(model), out / ROUTER_NAME)
    sizes = report["train_sizes"]
    result = {
        "pretrained": True, "init": settings.init, "bucketing": settings.bucketing, "train_sizes": sizes,
        "heldout_records": len(held_idx), "record_accuracy": after.get("record_accuracy"),
        "token_accuracy": after.get("token_accuracy"), "record_accuracy_before": before.get("record_accuracy"),
        "token_accuracy_before": before.get("token_accuracy"), "chance": 1 / len(sizes),
        "majority_bucket_share": max(sizes) / max(sum(sizes), 1), "history": history,
        "settings": dataclasses.asdict(settings),
    }
    _write_json(out / ACCURACY_NAME, result)
    acc = result["record_accuracy"]
    print(f"route: held-out routing accuracy {acc:.3f} (before {result['record_accuracy_before']:.3f}, chance "
          f"{result['chance']:.3f})" if acc is not None else "route: no held-out seed records")
    return result


def route_done(cfg: UpitConfig) -> bool:
    out = cfg.stage_dir("route")
    return (out / ROUTER_NAME).is_file() and (out / ACCURACY_NAME).is_file()
