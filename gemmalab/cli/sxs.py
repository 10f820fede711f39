"""`gemmalab sxs`: side-by-side evaluation of two models by a judge (docs/sxs.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gemmalab.cli.common import (add_dtype, nonnegative_float, nonnegative_int, positive_float, positive_int,
                                 probability, set_threads)


def add_parser(sub) -> None:
    p = sub.add_parser("sxs", help="side-by-side evaluation: two models, one judge, both answer orders (docs/sxs.md)")
    p.add_argument("--model", required=True, help="the model tested: a model REF or a stage's run directory")
    p.add_argument("--baseline", required=True, help="the model it is compared with (REF or run directory)")
    judge = p.add_mutually_exclusive_group(required=True)
    judge.add_argument("--judge", help="a model REF judging locally, or `reference` (prompts with known answers)")
    judge.add_argument("--judge-url", help="an OpenAI-compatible API base, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", help="the model name the API knows (with --judge-url)")
    p.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--judge-max-tokens", type=positive_int, default=512, help="room for the API judge's reasoning and verdict")
    p.add_argument("--judge-concurrency", type=positive_int, default=4, help="API requests in flight at once")
    p.add_argument("--judge-rps", type=positive_float, help="at most this many API requests per second")
    p.add_argument("--judge-retries", type=nonnegative_int, default=6, help="retries per request on 429, 5xx or no connection")
    p.add_argument("--prompts", type=Path, help='JSONL {"prompt", "category", "reference"?} (default: the built-in set)')
    p.add_argument("--categories", help="comma-separated categories to keep")
    p.add_argument("--limit", type=positive_int, help="the first N prompts of each category")
    p.add_argument("--max-new-tokens", type=nonnegative_int, default=256, help="answer length limit of both models")
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="the model's (0: greedy)")
    p.add_argument("--top-p", type=probability)
    p.add_argument("--baseline-temperature", type=nonnegative_float, default=0.0, help="the baseline's (0: greedy)")
    p.add_argument("--baseline-top-p", type=probability)
    p.add_argument("--seed", type=int, default=1234, help="sampling seed of both models; the bootstrap's is 0")
    p.add_argument("--batch-size", type=positive_int, default=16)
    add_dtype(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=positive_int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", type=Path, default=Path("runs/sxs"), help="run directory (resumes the run it holds)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def config(args: argparse.Namespace):
    """The SxSConfig of the flags."""
    from gemmalab.evaluate.sxs import JudgeConfig, SideConfig, SxSConfig

    return SxSConfig(
        model=SideConfig(args.model, args.temperature, args.top_p, None, args.max_new_tokens, args.seed),
        baseline=SideConfig(args.baseline, args.baseline_temperature, args.baseline_top_p, None, args.max_new_tokens,
                            args.seed),
        judge=JudgeConfig(model=args.judge, url=args.judge_url, api_model=args.judge_model,
                          api_key_env=args.judge_api_key_env, max_tokens=args.judge_max_tokens,
                          concurrency=args.judge_concurrency, requests_per_s=args.judge_rps,
                          retries=args.judge_retries),
        prompts=str(args.prompts) if args.prompts else None,
        categories=tuple(c.strip() for c in args.categories.split(",") if c.strip()) if args.categories else (),
        limit=args.limit, dtype=args.dtype, device=args.device, batch_size=args.batch_size)


def run(args: argparse.Namespace) -> None:
    from gemmalab.evaluate.sxs import summary_lines, sxs

    cfg = config(args)
    set_threads(args.threads)
    result = sxs(cfg, args.out, progress=not args.quiet)
    for line in summary_lines(result):
        print(line)
    print(f"wrote {args.out / 'result.json'} and {args.out / 'sxs.html'}")
