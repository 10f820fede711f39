"""`gemmalab tokenizer train`: a SentencePiece tokenizer with Gemma's settings."""

from __future__ import annotations

import argparse
from pathlib import Path

from gemmalab.cli.common import nonnegative_int, positive_int


def add_parser(sub) -> None:
    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a SentencePiece tokenizer with Gemma's settings")
    t.add_argument("--input", nargs="+", required=True, help="text or JSONL files (.gz allowed)")
    t.add_argument("--vocab-size", type=positive_int, required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--input-sentence-size", type=nonnegative_int, default=0, help="sample this many texts (0: all)")
    t.add_argument("--seed", type=int, default=0, help="of the sample (the same inputs and seed: the same model)")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from gemmalab.tokenizer import train_tokenizer

    tok = train_tokenizer(args.input, args.vocab_size, args.out, input_sentence_size=args.input_sentence_size,
                          seed=args.seed)
    print(f"wrote {Path(args.out) / 'tokenizer.model'} ({tok.vocab_size} pieces)")
