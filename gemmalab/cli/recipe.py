"""`gemmalab recipe`: the whole recipe from one file, stage after stage, each resumable (docs/recipe.md)."""

from __future__ import annotations

import argparse
import json

from gemmalab.cli.common import positive_float, positive_int, probability


def add_parser(sub) -> None:
    p = sub.add_parser("recipe", help="the whole recipe: data, pretraining, SFT, reward model, RLHF, benchmarks, "
                                      "side by side, memorization (docs/recipe.md)",
                       usage="gemmalab recipe --config FILE.toml [key=value ...] [--out DIR] [--dry-run ...]")
    p.add_argument("--config", required=True, help="a recipe TOML, e.g. configs/recipes/tiny.toml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help='recipe overrides, e.g. sft.set=["train.steps=50"]')
    p.add_argument("--out", help="the recipe's run directory (default: the config's out_dir); a rerun continues it")
    p.add_argument("--dry-run", action="store_true", help="print the plan (devices, memory, tokens, steps, time, "
                                                          "carbon) and exit")
    p.add_argument("--world-size", type=positive_int, default=8, help="devices of the plan's training stages (RLHF: one)")
    p.add_argument("--peak-tflops", type=positive_float, default=989.0, help="per device, bf16 dense (an H100 SXM: 989)")
    p.add_argument("--mfu", type=probability, default=0.4, help="the fraction of peak the plan assumes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """0 when every stage is done, 143 when a signal stopped a stage (rerun to continue)."""
    import logging

    from gemmalab.config import load
    from gemmalab.recipe import RecipeConfig, recipe
    from gemmalab.train.parallel import teardown

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load(RecipeConfig, args.config, args.overrides)
    if args.dry_run:
        from gemmalab.recipe import plan, plan_lines

        print("\n".join(plan_lines(plan(cfg, args.world_size, args.peak_tflops, args.mfu))))
        return 0

    def said(stage: str, what: str) -> None:
        print(f"== {stage}: {what}", flush=True)

    try:
        result = recipe(cfg, args.out, on_stage=said)
    finally:
        teardown()
    if result["status"] == "interrupted":
        print("interrupted: run the same command again to continue")
        return 143
    for stage, info in result["stages"].items():
        print(f"{stage:<13} {json.dumps(info, default=str)}")
    print(f"wrote {result['out_dir']}/result.json; report: {result['report']['html']}, model card: "
          f"{result['report']['card']}")
    return 0
