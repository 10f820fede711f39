"""`gemmalab reward`: train a Bradley-Terry reward model; `gemmalab reward score`: score answers with one
(docs/alignment.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gemmalab.cli.common import add_stage_args, positive_int, run_training
from gemmalab.errors import GemmalabError


def add_parser(sub) -> None:
    p = sub.add_parser("reward", help="train a Bradley-Terry reward model (docs/alignment.md); "
                                      "`gemmalab reward score --model REF --input FILE.jsonl` scores answers",
                       usage="gemmalab reward --config FILE.toml [key=value ...] [--out DIR] [--resume]\n"
                             "       gemmalab reward score --model REF --input FILE.jsonl [--output FILE.jsonl] "
                             "[--batch-size N]")
    add_stage_args(p, "configs/reward/tiny.toml")
    p.set_defaults(func=run, subcommand_args=[])
    # `score` is told apart from key=value overrides (which always hold "="); --config is then not needed
    p._actions[[a.dest for a in p._actions].index("config")].required = False


def _score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemmalab reward score", description="Score answers with a reward model.")
    p.add_argument("--model", required=True, help="a reward model directory (OUT/model of `gemmalab reward`) or run directory")
    p.add_argument("--input", required=True, type=Path,
                   help='JSONL: {"prompt": str | messages, "response": str} or {"messages": [...]} ending in a model turn')
    p.add_argument("--output", type=Path, help="where to write the lines with a \"reward\" field (default: stdout)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", default="cpu")
    return p


def run(args: argparse.Namespace) -> int:
    if args.overrides and args.overrides[0] == "score":
        return _score(_score_parser().parse_args(args.overrides[1:] + args.subcommand_args))
    if args.config is None:
        raise GemmalabError("`gemmalab reward` needs --config FILE.toml (or `gemmalab reward score ...` to score).")
    from gemmalab.config import load
    from gemmalab.train.reward import RewardConfig, reward

    cfg = load(RewardConfig, args.config, args.overrides)
    return run_training(lambda: reward(cfg, args.out, resume=args.resume),
                        ("steps", "final_loss", "heldout_accuracy_before", "heldout_accuracy", "pairs_trained",
                         "seconds", "model_dir"))


def _items(path: Path) -> list[tuple[dict, list[dict], str]]:
    from gemmalab.data.dialogue import parse_dialogue
    from gemmalab.files import jsonl_lines

    items = []
    for n, obj, problem in jsonl_lines(path):
        where = f"{path}, line {n}"
        if problem is not None:
            raise GemmalabError(f"{where}: {problem}")
        try:
            if "messages" in obj:
                messages = parse_dialogue(obj)
                if messages[-1]["role"] != "model":
                    raise GemmalabError("the last message must be the model's (the answer to score)")
                items.append((obj, messages[:-1], messages[-1]["content"]))
            elif isinstance(obj.get("response"), str) and "prompt" in obj:
                prompt = obj["prompt"]
                messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
                    parse_dialogue({"messages": prompt})
                items.append((obj, messages, obj["response"]))
            else:
                raise GemmalabError('expected {"prompt": str | messages, "response": str} or {"messages": [...]}')
        except GemmalabError as e:
            raise GemmalabError(f"{where}: {e}") from None
    return items


def _score(args: argparse.Namespace) -> int:
    from gemmalab.model.heads import load_scored
    from gemmalab.train.reward import score

    if args.batch_size < 1:
        raise GemmalabError("--batch-size must be >= 1")
    items = _items(args.input)
    model, tokenizer = load_scored(args.model, device=args.device)
    rewards = score(model, tokenizer, [(m, a) for _, m, a in items], args.batch_size)
    lines = "".join(json.dumps({**obj, "reward": r}, ensure_ascii=False) + "\n" for (obj, _, _), r in zip(items, rewards))
    if args.output is None:
        sys.stdout.write(lines)
    else:
        from gemmalab.files import atomic_write

        atomic_write(args.output, lines)
        print(f"{len(items)} answers scored -> {args.output}", file=sys.stderr)
    return 0
