"""`gemmalab sft`: supervised fine-tuning in the Gemma dialogue format, full or LoRA (docs/sft.md)."""

from __future__ import annotations

import argparse

from gemmalab.cli.common import add_stage_args, run_training


def add_parser(sub) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning, full or LoRA (docs/sft.md)")
    add_stage_args(p, "configs/sft/tiny.toml")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """0 when finished, 143 when stopped by SIGTERM (a checkpoint was written; --resume continues)."""
    from gemmalab.config import load
    from gemmalab.train.sft import SFTConfig, sft

    cfg = load(SFTConfig, args.config, args.overrides)
    return run_training(lambda: sft(cfg, args.out, resume=args.resume),
                        ("steps", "final_loss", "accuracy_before", "accuracy_after", "heldout_loss_before",
                         "heldout_loss_after", "ended_turn_after", "dialogues_trained", "seconds", "model_dir",
                         "adapter_dir"))
