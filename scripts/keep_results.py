"""Copy the small result files of finished experiment runs into the repository, so the numbers outlive the runs.

    python scripts/keep_results.py runs/paper-small docs/results/paper-small-fair/runs

Run folders (models, checkpoints) are far too large to commit and a fresh checkout has none of them; the JSON
records that `scripts/paper_small_tables.py` and `sparsecraft compare`'s tables read are small. For each run folder
under SRC (UpIT pipelines: their `upit.json` and `upcycle/` stage) this copies the run's records, keeping the
folder layout, so the tables script reads the copy as it reads the runs. Files over 1 MiB are left out and named.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

# glob patterns under a run folder: every evaluation's summaries (eval, eval-independent, eval-humaneval-*, ...)
RECORDS = ["recipe.json", "summary.json", "metrics.jsonl", "upit.json", "eval*/results.json", "eval*/quick.json",
           "routes/routes.json"]
LIMIT = 1 << 20


def keep(run: Path, dest: Path) -> list[str]:
    """Copy `run`'s records into `dest`; returns the relative paths copied."""
    copied = []
    for src in sorted(path for pattern in RECORDS for path in run.glob(pattern) if path.is_file()):
        name = src.relative_to(run)
        if src.stat().st_size > LIMIT:
            print(f"left out (over 1 MiB): {src}")
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / name)
        copied.append(str(name))
    return copied


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: keep_results.py SRC_ROOT DEST_ROOT")
    src_root, dest_root = Path(sys.argv[1]), Path(sys.argv[2])
    for folder in sorted(src_root.glob("*-s[0-9]*")):
        run = folder / "upcycle" if (folder / "upit.json").is_file() else folder
        if not (run / "summary.json").is_file():
            continue  # not finished: its records would only be partial
        for part in dict.fromkeys([folder, run]):  # an UpIT pipeline: its upit.json, then its trained stage
            copied = keep(part, dest_root / part.relative_to(src_root))
            print(f"{part}: {len(copied)} files")


if __name__ == "__main__":
    main()
