"""Flags and steps several commands share: the model reference, runtime and sampling flags, loading a model."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import torch

from gemmalab.dtypes import DTYPE_CHOICES, parse_dtype
from gemmalab.errors import GemmalabError


def dtype_arg(value: str) -> torch.dtype:
    """argparse `type` for --dtype: either spelling (bf16 or bfloat16)."""
    try:
        return parse_dtype(value)
    except GemmalabError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _checked(kind: type, ok: Callable[[int | float], bool], rule: str) -> Callable[[str], int | float]:
    """An argparse `type`: the value read as `kind` (int: a whole number; float: a finite number) and refused
    unless `ok`, so that `--batch-size 0` or `--top-p 7` is a usage error naming the flag, not a traceback later."""
    what = "a whole number" if kind is int else "a number"

    def parse(value: str) -> int | float:
        try:
            n = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if (kind is float and not math.isfinite(n)) or not ok(n):  # an int is finite (and may be too big for a float)
            raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
        return n

    return parse


positive_int = _checked(int, lambda n: n >= 1, ">= 1")  # --batch-size, --threads, --limit, ...
nonnegative_int = _checked(int, lambda n: n >= 0, ">= 0")  # --max-new-tokens, --judge-retries, ...
positive_float = _checked(float, lambda n: n > 0, "> 0")  # --code-timeout, --judge-rps, ...
nonnegative_float = _checked(float, lambda n: n >= 0, ">= 0")  # --temperature, --batch-wait-ms, ...
probability = _checked(float, lambda n: 0 < n <= 1, "in (0, 1]")  # --top-p, --mfu
port = _checked(int, lambda n: 0 <= n <= 65535, "a port number from 0 to 65535")


def add_dtype(p: argparse.ArgumentParser) -> None:
    """--dtype of an inference command: auto by default (bf16 where it is native and fast, else fp32)."""
    p.add_argument("--dtype", type=dtype_arg, default="auto", metavar="|".join(DTYPE_CHOICES),
                   help="weights and activations (default auto: bf16 on CUDA and on CPUs that run it natively and "
                        "fast, else fp32; the choice is logged)")


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory, .gguf file, .ckpt file or registered name (gemma3-270m)")
    p.add_argument("--preset", help="model preset for a gemma_pytorch .ckpt, which carries no config (e.g. gemma-2b)")


def add_runtime(p: argparse.ArgumentParser) -> None:
    add_dtype(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="weight-only quantization (int8: near-lossless; int4: faster; a GGUF's Q4_K/Q4_0 matrices keep "
                        "the file's grid, elsewhere int4 costs perplexity, about 1.4-2x)")


def add_sampling(p: argparse.ArgumentParser, temperature: float, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=nonnegative_int, default=max_new_tokens)
    p.add_argument("--temperature", type=nonnegative_float, default=temperature, help="0 is greedy")
    p.add_argument("--top-k", type=positive_int)
    p.add_argument("--top-p", type=probability)
    p.add_argument("--seed", type=int)
    add_runtime(p)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def load_model(ref: str | Path, preset: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
               quantize: str | None = None):
    """(model, tokenizer) of a model reference, optionally quantized for inference."""
    import gemmalab
    from gemmalab.model import get_preset

    return gemmalab.load(ref, dtype=dtype, device=device, config=get_preset(preset) if preset else None,
                         quantize=quantize)


def load_runtime_model(args: argparse.Namespace):
    """`load_model` with the flags of `add_model` and `add_runtime`; threads set first."""
    set_threads(args.threads)
    return load_model(args.model, args.preset, args.dtype, args.device, args.quantize)


def require_tokenizer(tokenizer, ref):
    if tokenizer is None:
        raise GemmalabError(f"Model {ref} has no tokenizer (tokenizer.model); add one to the model directory.")
    return tokenizer


def add_stage_args(p: argparse.ArgumentParser, example: str) -> None:
    """The flags of a stage run from a config file: --config, key=value overrides, --out, --resume."""
    p.add_argument("--config", required=True, help=f"TOML config, e.g. {example}")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")
    p.add_argument("--out", help="run directory (default: the config's out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")


def run_training(stage: Callable[[], dict], keys: tuple[str, ...]) -> int:
    """Run a training stage (logging on, the process group torn down after): 143 when a signal stopped it (a
    checkpoint was written; --resume continues), else 0 after printing its headline figures (rank 0)."""
    import json
    import logging
    import os

    from gemmalab.train.parallel import teardown

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = stage()
    finally:
        teardown()
    if result["status"] == "interrupted":
        return 143
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: result[k] for k in keys if k in result}))
    return 0
