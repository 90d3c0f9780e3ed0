"""Writing routing statistics out: `routes.json`, the CSVs, the plots, and a summary for the terminal.

The statistics themselves are `route_stats.RoutingStats`; they are gathered by `route_collect` (from a model's
forwards) and `route_data` (over data files, tokenised as in training).

    stats = routing_stats(model, tokenizer, data_sources(["math=heldout/math.jsonl", "code.jsonl"]))
    write_routes(stats, "runs/pesc/routes")      # routes.json, CSVs, heatmap and per-source plots
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .route_stats import ROUTES_JSON, RoutingStats


def write_route_csvs(stats: RoutingStats, out_dir: str | os.PathLike) -> list[Path]:
    """`layers.csv` (per layer), `experts.csv` (per layer and expert), `coselection.csv` (pairs i < j) and
    `sources.csv` (per source, layer and expert)."""
    from .plots import write_csv

    out = Path(out_dir)
    share, gate = stats.token_share(), stats.mean_gate()
    router_h, load_h = stats.router_entropy(), stats.load_entropy()
    imbalance, special, mi = stats.load_imbalance(), stats.specialisation(), stats.domain_mi()
    max_h = math.log(stats.num_experts)
    written = [write_csv(out / "layers.csv",
                         ["layer", "tokens", "router_entropy", "load_entropy", "max_entropy", "load_imbalance",
                          "specialisation", "domain_mi"],
                         [(layer, stats.tokens, float(router_h[i]), float(load_h[i]), max_h, float(imbalance[i]),
                           float(special[i]), float(mi[i])) for i, layer in enumerate(stats.layers)])]
    written.append(write_csv(out / "experts.csv", ["layer", "expert", "slots", "token_share", "mean_gate"],
                             [(layer, e, int(stats.counts[i, e]), float(share[i, e]), float(gate[i, e]))
                              for i, layer in enumerate(stats.layers) for e in range(stats.num_experts)]))
    written.append(write_csv(out / "coselection.csv", ["layer", "expert_i", "expert_j", "tokens", "fraction"],
                             [(layer, a, b, int(stats.coselection[i, a, b]),
                               int(stats.coselection[i, a, b]) / max(stats.tokens, 1))
                              for i, layer in enumerate(stats.layers)
                              for a in range(stats.num_experts) for b in range(a + 1, stats.num_experts)]))
    source_share = stats.source_share()
    written.append(write_csv(out / "sources.csv", ["source", "layer", "expert", "slots", "share",
                                                   "share_minus_uniform"],
                             [(name, layer, e, int(stats.source_counts[s, i, e]), float(source_share[s, i, e]),
                               float(source_share[s, i, e]) - 1.0 / stats.num_experts)
                              for s, name in enumerate(stats.sources) for i, layer in enumerate(stats.layers)
                              for e in range(stats.num_experts)]))
    return written


def write_routes(stats: RoutingStats, out_dir: str | os.PathLike, metrics_path: str | os.PathLike | None = None,
                 title: str | None = None) -> list[Path]:
    """Write `routes.json`, the CSVs and the plots (load heatmap, per-source share, co-selection, and the
    aux-loss / load-imbalance curve when a training `metrics.jsonl` is given and holds router metrics)."""
    from .plots import (
        atomic_write,
        plot_coselection,
        plot_domain_share,
        plot_load_heatmap,
        plot_router_curves,
        read_metrics,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"{title}: " if title else ""
    written = [atomic_write(out / ROUTES_JSON, stats.to_json())]
    written += write_route_csvs(stats, out)
    written.append(plot_load_heatmap(stats.token_share().numpy(), stats.layers, out / "load_heatmap.png",
                                     f"{prefix}expert load, share of routed slots ({stats.tokens} tokens)"))
    if stats.sources:
        share = stats.source_share()
        written.append(plot_domain_share({n: share[s].numpy() for s, n in enumerate(stats.sources)}, stats.layers,
                                         out / "domain_share.png", f"{prefix}which experts each source uses"))
    if stats.top_k > 1:
        written.append(plot_coselection(stats.coselection_fraction().mean(0).numpy(), out / "coselection.png"))
    if metrics_path is not None:
        curve = plot_router_curves({title or "run": read_metrics(metrics_path)}, out / "router_curves.png")
        if curve is not None:
            written.append(curve)
    return written


def format_summary(stats: RoutingStats) -> str:
    """A few lines for the terminal: per layer entropy, balance and each source's favourite expert."""
    max_h = math.log(stats.num_experts)
    router_h, load_h = stats.router_entropy(), stats.load_entropy()
    imbalance, special, mi = stats.load_imbalance(), stats.specialisation(), stats.domain_mi()
    top = stats.top_experts()
    head = (f"{stats.method}: {stats.tokens} tokens, {len(stats.layers)} layers, {stats.num_experts} experts, "
            f"top-{stats.top_k}; entropies in nats (uniform = {max_h:.3f})")
    lines = [head,
             "layer  router_H  load_H  imbalance  specialisation  domain_MI  "
             + "  ".join(f"top[{n}]" for n in stats.sources)]
    for i, layer in enumerate(stats.layers):
        lines.append(f"{layer:>5}  {router_h[i]:8.3f}  {load_h[i]:6.3f}  {imbalance[i]:9.2f}  {special[i]:14.3f}  "
                     f"{mi[i]:9.3f}  "
                     + "  ".join(f"{top[n][i]:>{len(n) + 5}}" for n in stats.sources))
    return "\n".join(lines)
