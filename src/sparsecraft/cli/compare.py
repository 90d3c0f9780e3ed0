"""`sparsecraft compare RUN_DIR ... --out DIR`: one Markdown + HTML report comparing training runs."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare training runs in one report (Markdown with PNGs, and self-contained HTML)",
        description="Read each run directory (summary.json, metrics.jsonl, recipe.json, optional eval/ and "
                    "routes/) and write OUT/report.md, OUT/report.html and the plots. Runs differing only in "
                    "train.seed are grouped (mean ± std). A directory holding run directories stands for all.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training output directories")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--title", default="sparsecraft run comparison")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..evaluate.compare import write_report

    paths = write_report(args.runs, args.out, title=args.title)
    print(f"report: {paths['markdown']} and {paths['html']}")
    return 0
