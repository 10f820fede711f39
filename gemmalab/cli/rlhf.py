"""`gemmalab rlhf`: policy optimisation (RLOO or PPO) of an SFT model against a reward model (docs/alignment.md)."""

from __future__ import annotations

import argparse

from gemmalab.cli.common import add_stage_args, run_training


def add_parser(sub) -> None:
    p = sub.add_parser("rlhf", help="RLHF: RLOO or PPO against a reward model, with KL control and guards "
                                    "(docs/alignment.md)")
    add_stage_args(p, "configs/rlhf/tiny.toml")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """0 when finished or stopped by a guard (result.json says which), 143 when stopped by SIGTERM (a checkpoint was
    written; --resume continues)."""
    from gemmalab.config import load
    from gemmalab.train.rlhf import RLHFConfig, rlhf

    cfg = load(RLHFConfig, args.config, args.overrides)
    return run_training(lambda: rlhf(cfg, args.out, resume=args.resume),
                        ("status", "steps", "accuracy_before", "accuracy_after", "reward_before", "reward_after", "kl",
                         "judge_win_rate", "stopped_by_guard", "seconds", "model_dir"))
