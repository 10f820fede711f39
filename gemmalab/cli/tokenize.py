"""`gemmalab tokenize`: text to token ids, from --text or a JSONL file."""

from __future__ import annotations

import argparse
import json

from gemmalab.cli.common import require_tokenizer
from gemmalab.errors import GemmalabError


def add_parser(sub) -> None:
    p = sub.add_parser("tokenize", help="text to token ids")
    p.add_argument("--model", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--input", help='JSONL file, one {"text": ...} object per line')
    p.add_argument("--no-bos", action="store_true")
    p.add_argument("--json", action="store_true", help='one {"ids": [...]} object per input')
    p.set_defaults(func=run)


def texts(text: str | None, path: str | None):
    """(line number, text) pairs from `text` or a JSONL file of {"text": ...} objects."""
    from gemmalab.files import read_jsonl

    if text is not None:
        yield 1, text
        return
    for n, obj in read_jsonl(path):
        if not isinstance(obj.get("text"), str):
            raise GemmalabError(f'{path}, line {n}: expected an object with a string field "text".')
        yield n, obj["text"]


def run(args: argparse.Namespace) -> None:
    from gemmalab.checkpoint import load_tokenizer

    from gemmalab.tokenizer import TokenizerError

    tokenizer = require_tokenizer(load_tokenizer(args.model), args.model)
    for n, text in texts(args.text, args.input):
        try:
            ids = tokenizer.encode(text, bos=not args.no_bos)
        except TokenizerError as e:  # a lone surrogate from a JSON escape
            raise GemmalabError(f"{f'{args.input}, line {n}' if args.input else '--text'}: {e}") from None
        print(json.dumps({"ids": ids}) if args.json else " ".join(map(str, ids)))
