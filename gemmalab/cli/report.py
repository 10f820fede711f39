"""`gemmalab report RUN_DIR`: the recipe's HTML report and model card (docs/recipe.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="a recipe run's HTML report and model card (docs/recipe.md)")
    p.add_argument("run_dir", type=Path, help="the recipe's run directory (gemmalab recipe --out)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from gemmalab.report import write_report

    paths = write_report(args.run_dir)
    print(f"wrote {paths['html']} and {paths['card']}")
