"""`gemmalab pretrain`: pretrain a model on token shards (docs/train.md; under torchrun for several devices)."""

from __future__ import annotations

import argparse
import json
import logging
import os


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model (docs/train.md; torchrun for several devices)")
    p.add_argument("--config", required=True, help="TOML config, e.g. configs/train/tiny.toml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")
    p.add_argument("--out", help="run directory (default: the config's out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print the plan (parameters, memory, tokens) and exit")
    p.add_argument("--world-size", type=int, help="devices for --dry-run (default: WORLD_SIZE, else 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """0 when finished, 143 when stopped by SIGTERM (a checkpoint was written; --resume continues)."""
    from gemmalab.config import load
    from gemmalab.train.parallel import teardown
    from gemmalab.train.pretrain import PretrainConfig, dry_run, pretrain

    cfg = load(PretrainConfig, args.config, args.overrides)
    if args.dry_run:
        dry_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1")))
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = pretrain(cfg, args.out, resume=args.resume)
    finally:
        teardown()
    if result["status"] == "interrupted":
        return 143
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("steps", "tokens", "final_loss", "seconds", "tokens_per_s", "mfu", "model_dir")
        print(json.dumps({k: result[k] for k in keys if k in result}))
    return 0
