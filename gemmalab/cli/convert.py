"""`gemmalab convert`: any checkpoint (HF directory, .gguf, .ckpt) to the HF layout."""

from __future__ import annotations

import argparse

import torch

from gemmalab.cli.common import dtype_arg, load_model
from gemmalab.dtypes import DTYPE_CHOICES, dtype_name
from gemmalab.errors import GemmalabError


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint (HF dir, .gguf, .ckpt) to the HF layout")
    p.add_argument("model", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--to", default="hf")
    p.add_argument("--preset", help="model preset for a gemma_pytorch .ckpt (e.g. gemma-2b)")
    p.add_argument("--tokenizer", help="tokenizer.model to include (default: the source's own)")
    p.add_argument("--dtype", type=dtype_arg, default=torch.float32, metavar="|".join(DTYPE_CHOICES))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from gemmalab.checkpoint import save_hf
    from gemmalab.tokenizer import Tokenizer

    if args.to != "hf":
        raise GemmalabError(f"--to {args.to}: only the Hugging Face layout (hf) can be written.")
    model, tokenizer = load_model(args.model, args.preset, args.dtype)
    if args.tokenizer:
        tokenizer = Tokenizer.from_file(args.tokenizer)
    out = save_hf(model, args.dst, tokenizer)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n:,} parameters, {dtype_name(args.dtype)}{', with tokenizer' if tokenizer else ', no tokenizer'})")
