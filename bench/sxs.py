"""The [sxs] real run: Gemma 3 270M (greedy) against a deliberately weakened copy of itself (sampled at a high
temperature), judged by Gemma 3 270M through its label log-probabilities, on the built-in prompts.

    .venv/bin/python bench/sxs.py [--temperature 1.5] [--max-new-tokens 96] [--limit N] [--out bench/out/sxs]

Resumes what --out holds (delete it for a fresh timing). Prints the terminal table, then one JSON object: the
headline figures, the time of each phase, and the CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from machine import cpu

from gemmalab.evaluate.sxs import JudgeConfig, SideConfig, SxSConfig, summary_lines, sxs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--temperature", type=float, default=1.5, help="the weakened baseline's")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--limit", type=int, help="prompts per category")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("bench/out/sxs"))
    args = parser.parse_args()
    cfg = SxSConfig(model=SideConfig(args.model, max_new_tokens=args.max_new_tokens),
                    baseline=SideConfig(args.model, temperature=args.temperature, max_new_tokens=args.max_new_tokens),
                    judge=JudgeConfig(model=args.model), limit=args.limit, batch_size=args.batch_size)
    result = sxs(cfg, args.out)
    print("\n".join(summary_lines(result)))
    keys = ("n", "wins", "ties", "losses", "win_rate", "ci95", "flip_rate", "lc_win_rate", "winner", "ended_turn",
            "mean_answer_chars", "seconds", "timings")
    print(json.dumps({**{k: result[k] for k in keys}, "temperature": args.temperature,
                      "max_new_tokens": args.max_new_tokens, "cpu": cpu(), "threads": torch.get_num_threads(),
                      "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()
