"""The tables of docs/results.md's paper-small comparison, from the run folders that run.sh / analyse.sh leave.

    python scripts/paper_small_tables.py [runs/paper-small]

Groups runs by their name without the seed (`camel-s0` -> camel; UpIT: `upit-sN/upcycle`), prints Markdown
tables with mean ± sample standard deviation over the finished seeds: bundled held-out loss per domain, the
independent held-out set (response loss per domain, short-answer match, code pass@1), the bundled
multiple-choice tasks, routing on the held-out records (mean over layers), tokens/s, peak memory, trainable
parameters. A run is counted only once its evaluations exist.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from sparsecraft.evaluate.run_groups import seedless_name

ORDER = ["dense", "camel", "dense-matched", "pesc", "pesc-camelidae", "mixlora", "upcycle", "upit"]


def read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def cell(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> None:
    """One Markdown table: the first column left-aligned, the rest right-aligned."""
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()


def collect(root: Path) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for folder in sorted(root.glob("*-s[0-9]*")):
        run = folder / "upcycle" if (folder / "upit.json").is_file() else folder
        summary, indep = read(run / "summary.json"), read(run / "eval-independent" / "results.json")
        if summary is None or indep is None:
            continue
        name = seedless_name(folder.name)
        groups.setdefault(name, []).append({
            "summary": summary, "indep": indep, "quick": read(run / "eval-independent" / "quick.json") or {},
            "mc": read(run / "eval" / "results.json") or {}, "routes": read(run / "routes" / "routes.json"),
            "humaneval": read(run / "eval-humaneval-chat" / "results.json")})
    return dict(sorted(groups.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99))


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/paper-small")
    groups = collect(root)

    def vals(runs, get):
        out = []
        for r in runs:
            try:
                v = get(r)
            except (KeyError, TypeError):
                continue
            if v is not None:
                out.append(float(v))
        return out

    def layer_mean(key):
        return lambda r: sum(r["routes"][key]) / len(r["routes"][key])

    rows = []
    for name, runs in groups.items():
        s = lambda k: vals(runs, lambda r: r["summary"][k])  # noqa: E731
        rows.append([name, str(len(runs)), f"{s('trainable_params')[0] / 1e6:.2f} M",
                     f"{cell(s('initial_eval_loss'))} → **{cell(s('eval_loss'))}**",
                     *(cell(s(f"eval_loss/{d}")) for d in ("math", "code", "general")),
                     cell(s("tokens_per_s"), 1), cell([b / 2**30 for b in s("peak_mem_bytes")], 2)])
    table(["method", "seeds", "trainable", "held-out loss before → after", "math", "code", "general", "tokens/s",
           "peak memory GiB"], rows)
    rows = []
    for name, runs in groups.items():
        q = lambda src: vals(runs, lambda r: r["quick"]["sources"][src]["loss"])  # noqa: E731
        t = lambda task, m: vals(runs, lambda r: r["indep"]["tasks"][task][m])  # noqa: E731
        rows.append([name, *(cell(q(f"indep-{d}")) for d in ("math", "code", "general")),
                     cell(t("sc_indep_qa", "match")), cell(t("sc_indep_code", "pass@1"))])
    table(["method", "indep math loss", "indep code loss", "indep general loss", "short-answer match (48)",
           "code pass@1 (16)"], rows)
    rows = []
    for name, runs in groups.items():
        t = lambda task: vals(runs, lambda r: r["mc"]["tasks"][task]["acc"])  # noqa: E731
        he = vals(runs, lambda r: r["humaneval"]["tasks"]["sc_humaneval_chat"]["pass@1"])
        rows.append([name, *(cell(t(f"sc_{d}_mc")) for d in ("math", "code", "general")),
                     cell(he) if he else "not run"])
    table(["method", "sc_math_mc acc (23)", "sc_code_mc acc (17)", "sc_general_mc acc (27)",
           "HumanEval chat pass@1 (164)"], rows)
    rows = [[name, *(cell(vals(runs, layer_mean(k))) for k in
                     ("router_entropy", "load_imbalance", "specialisation", "domain_mi"))]
            for name, runs in groups.items() if any(r["routes"] for r in runs)]
    table(["method", "router entropy (max 2.079)", "load imbalance (max 4)", "specialisation", "domain MI"], rows)


if __name__ == "__main__":
    main()
