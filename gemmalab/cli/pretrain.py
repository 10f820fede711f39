"""`gemmalab pretrain`: pretrain a model on token shards (docs/train.md; under torchrun for several devices)."""

from __future__ import annotations

import argparse
import os

from gemmalab.cli.common import add_stage_args, positive_int, run_training


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model (docs/train.md; torchrun for several devices)")
    add_stage_args(p, "configs/train/tiny.toml")
    p.add_argument("--dry-run", action="store_true", help="print the plan (parameters, memory, tokens) and exit")
    p.add_argument("--world-size", type=positive_int, help="devices for --dry-run (default: WORLD_SIZE, else 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """0 when finished, 143 when stopped by SIGTERM (a checkpoint was written; --resume continues)."""
    from gemmalab.config import load
    from gemmalab.train.pretrain import PretrainConfig, dry_run, pretrain

    cfg = load(PretrainConfig, args.config, args.overrides)
    if args.dry_run:
        dry_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1")))
        return 0
    return run_training(lambda: pretrain(cfg, args.out, resume=args.resume),
                        ("steps", "tokens", "final_loss", "seconds", "tokens_per_s", "mfu", "model_dir"))
