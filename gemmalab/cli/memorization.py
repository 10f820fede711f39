"""`gemmalab memorization`: the memorization audit (docs/memorization.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gemmalab.cli.common import add_dtype, nonnegative_float, positive_int, set_threads


def add_parser(sub) -> None:
    p = sub.add_parser("memorization", help="memorization audit: exact and approximate, by source, with PII (docs/memorization.md)")
    p.add_argument("--model", required=True, help="model REF (directory, .gguf, gemma3-270m)")
    p.add_argument("--corpus", required=True, help="token shard folder (meta.json) or JSONL documents")
    p.add_argument("--samples", type=positive_int, default=10000, help="per source")
    p.add_argument("--prefix", type=positive_int, default=50)
    p.add_argument("--suffix", type=positive_int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--offset", choices=["start", "random"], default="start", help="where in each document the prompt starts")
    p.add_argument("--threshold", type=nonnegative_float, default=0.10, help="approximate: normalised token edit distance <= this")
    p.add_argument("--no-prune", action="store_true", help="decode every row to the end (every distance, and mean distances)")
    p.add_argument("--no-char-level", action="store_true",
                   help="leave out the character-level variant (rows then leave on the token-level bound alone: faster)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="rows per decode step")
    p.add_argument("--prefill-batch", type=positive_int, default=8, help="prompts prefilled together")
    add_dtype(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", type=Path, default=Path("runs/memorization"), help="run directory (resumes the audit it holds)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from gemmalab.evaluate.memorization import MemorizationConfig, memorization

    cfg = MemorizationConfig(model=str(args.model), corpus=str(args.corpus), samples=args.samples, prefix=args.prefix,
                             suffix=args.suffix, seed=args.seed, offset=args.offset, threshold=args.threshold,
                             prune=not args.no_prune, char_level=not args.no_char_level, batch_size=args.batch_size,
                             prefill_batch=args.prefill_batch, dtype=args.dtype, device=args.device)
    set_threads(args.threads)
    result = memorization(cfg, args.out, progress=not args.quiet)
    print(f"{'source':<24}{'samples':>8}{'exact':>9}{'approx':>9}  {'approx 95% CI':<17}{'mean dist':>10}  PII (sensitive / personal)")
    for name, s in result["sources"].items():
        ci = f"[{s['approx_ci95'][0]:.4f}, {s['approx_ci95'][1]:.4f}]"
        pii = f"{sum(s['pii']['sensitive'].values())} / {sum(s['pii']['personal'].values())}"
        mean = "pruned" if s["mean_distance"] is None else f"{s['mean_distance']:.3f}"
        print(f"{name:<24}{s['samples']:>8}{s['exact_rate']:>9.4f}{s['approx_rate']:>9.4f}  {ci:<17}{mean:>10}  {pii}")
    print(f"wrote {args.out / 'result.json'}, {args.out / 'memorized.jsonl'} and {args.out / 'memorization.png'}")
