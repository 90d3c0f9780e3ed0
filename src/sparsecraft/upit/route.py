"""UpIT stage 3: seed data bucketed by expert perplexity, router rows pre-trained on the buckets.

1. Seed: a seeded sample of the training records, part of it held out (`buckets.seed_split`).
2. Buckets: each seed record goes to the expert under which its perplexity is lowest (`buckets.expert_nll`);
   empty buckets are a warning.
3. Router pre-training on the MoE of all n experts, experts frozen by default (`router_pretrain.pretrain_router`:
   `lm_weight * L_lm + aux_weight * L_aux`).
4. Routing accuracy on the held-out seed records, before and after (`router_pretrain.routing_accuracy`).

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
from .buckets import bucket_report, expert_nll, seed_data
from .config import UpitConfig, stage_recipe
from .router_pretrain import pretrain_router, routing_accuracy

BUCKETS_NAME = "buckets.json"
ACCURACY_NAME = "accuracy.json"
EXPERTS_SUBDIR = "experts"  # only when the experts trained with the router (route.freeze_experts: false)


# ---------------------------------------------------------------------------------------------------- the stage


def _write_json(path: Path, data) -> None:
    atomic_write_json(path, data, indent=1)


def run_route(cfg: UpitConfig, es: ExpertSet, *, resume: bool = False) -> dict:
    """Stage 3 (see the module docstring). Reuses `buckets.json` when resuming. Returns accuracy.json's data."""
    from ..sources import load_base_model, resolve_base

    out = cfg.stage_dir("route")
    out.mkdir(parents=True, exist_ok=True)
    settings = cfg.route
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
    reuse = None
    if resume and buckets_path.is_file():
        reuse = json.loads(buckets_path.read_text())
        # buckets of another seed split or expert set would be matched to the wrong records: recompute those
        if ([r["index"] for r in reuse.get("records", [])] != train_idx + held_idx
                or reuse.get("experts") != list(es.names)):
            print(f"route: {buckets_path} is from another seed split or expert set; recomputing it")
            reuse = None
    if reuse is not None:
        report = reuse
        buckets = torch.tensor([r["bucket"] for r in report["records"]])
        print(f"route: reusing {buckets_path}")
    else:
        print(f"route: {len(train_idx)} + {len(held_idx)} held-out seed records, {len(es.states)} experts")
        nll = expert_nll(base, es, craft, seed_ds, collator, settings.batch_size, settings.tokens, device, progress)
        report = bucket_report(nll, sources, train_idx, held_idx, list(es.names), settings.tokens)
        buckets = nll.argmin(0)
        _write_json(buckets_path, report)
    print(f"route: bucket sizes {dict(zip(report['experts'], report['sizes']))}")
    if report["empty"]:
        warnings.warn(f"route: no seed record chose expert(s) {', '.join(report['empty'])}; their router rows "
                      "learn from negatives only", stacklevel=2)
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
    sizes = report["sizes"]
    result = {
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

