"""`gemmalab` command line: one module per command, each with `add_parser(subparsers)` and `run(args)`.

Handlers parse, call the library with typed values, and print. A GemmalabError (bad input) is printed as one
paragraph and exits with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from gemmalab.cli import (chat, convert, data, evaluate, generate, memorization, pretrain, recipe, report, reward, rlhf,
                          serve, sft, sxs, tokenize, tokenizer)
from gemmalab.errors import GemmalabError

COMMANDS = (generate, chat, serve, tokenize, convert, tokenizer, data, pretrain, sft, reward, rlhf, evaluate, sxs,
            memorization, recipe, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemmalab", description="The Gemma recipe on PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "subcommand_args", None) is not None and args.overrides[:1] == ["score"]:
        args.subcommand_args = extra  # `reward score --model ...`: its own flags, parsed by the command
    elif extra:  # `key=value` overrides may follow other flags (`pretrain --config F --resume train.steps=9`)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides += extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args) or 0
    except GemmalabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
