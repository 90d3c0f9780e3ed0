"""`sparsecraft` command line: thin subcommands that parse, call the library and print.

Expected failures (bad input, bad config, missing files) print one `error:` line and exit 2; anything else
prints one line too and exits 1, with the traceback only when SPARSECRAFT_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import SparsecraftError
from . import bench as bench_cmd
from . import compare as compare_cmd
from . import convert as convert_cmd
from . import craft as craft_cmd
from . import eval as eval_cmd
from . import export as export_cmd
from . import generate as generate_cmd
from . import push as push_cmd
from . import routes as routes_cmd
from . import serve as serve_cmd
from . import train as train_cmd
from . import upit as upit_cmd

COMMANDS = {
    "craft": craft_cmd, "train": train_cmd, "generate": generate_cmd, "export": export_cmd, "convert": convert_cmd,
    "bench": bench_cmd, "eval": eval_cmd, "routes": routes_cmd, "compare": compare_cmd,
    "upit": upit_cmd, "push": push_cmd, "serve": serve_cmd,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsecraft",
        description="Craft dense decoder LMs into parameter-efficient Mixture-of-Experts and tune them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except SparsecraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI promises one line, never a traceback
        if os.environ.get("SPARSECRAFT_DEBUG"):
            raise
        first = str(exc).strip().splitlines()
        print(f"error: {type(exc).__name__}: {first[0] if first else ''} (SPARSECRAFT_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
