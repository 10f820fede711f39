"""`gemmalab convert`: any checkpoint (HF directory, .gguf, .ckpt) to the HF layout."""

from __future__ import annotations

import argparse
from pathlib import Path

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
    from gemmalab.checkpoint import resolve, save_hf
    from gemmalab.files import atomic_dir
    from gemmalab.tokenizer import Tokenizer

    if args.to != "hf":
        raise GemmalabError(f"--to {args.to}: only the Hugging Face layout (hf) can be written.")
    dst = Path(args.dst)
    check_destination(resolve(args.model), dst)
    model, tokenizer = load_model(args.model, args.preset, args.dtype)
    if args.tokenizer:
        tokenizer = Tokenizer.from_file(args.tokenizer)
    with atomic_dir(dst) as tmp:  # the old DST stays whole until the new one is written
        save_hf(model, tmp, tokenizer)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {dst} ({n:,} parameters, {dtype_name(args.dtype)}{', with tokenizer' if tokenizer else ', no tokenizer'})")


def check_destination(src: Path, dst: Path) -> None:
    """DST is replaced as a whole: refuse one that is the source or holds it (also through symlinks), and an
    existing folder that is not a model directory (its files would be deleted)."""
    s, d = src.resolve(), dst.resolve()
    if s == d or d in s.parents:
        raise GemmalabError(f"convert: DST {dst} is {'the source' if s == d else f'a folder holding the source {src}'}"
                            f"; it would be replaced while read. Name another folder.")
    if (dst.exists() or dst.is_symlink()) and not dst.is_dir():  # a file, or a link to nothing
        raise GemmalabError(f"convert: DST {dst} is a file; name a folder (it is written as a whole).")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / "config.json").is_file():
        raise GemmalabError(f"convert: DST {dst} is a folder that is not empty and not a model directory (no "
                            f"config.json); it would be replaced as a whole. Name a new, empty or model folder.")
