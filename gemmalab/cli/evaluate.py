"""`gemmalab eval`: benchmarks (MMLU, MBPP, HumanEval, GSM8K, multiple choice; docs/evaluate.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from gemmalab.cli.common import (add_model, add_runtime, load_runtime_model, positive_float, positive_int,
                                 require_tokenizer)
from gemmalab.errors import GemmalabError


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="benchmarks: MMLU, MBPP, HumanEval, GSM8K, multiple choice (docs/evaluate.md)")
    add_model(p)
    p.add_argument("--tasks", required=True, help="comma-separated: mmlu,mbpp,humaneval,gsm8k,arc_easy,... or task .toml files")
    p.add_argument("--data-dir", type=Path, help="local task files, DIR/TASK/... in the published formats")
    p.add_argument("--limit", type=positive_int, help="first N samples of each task")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="run model-written code (HumanEval, MBPP) in the bubblewrap sandbox")
    p.add_argument("--code-timeout", type=positive_float, default=3.0, help="seconds per program in the sandbox")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--seed", type=int, default=1234, help="for sampled generations")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="run directory (resumes if it holds this run)")
    add_runtime(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from gemmalab.evaluate import evaluate, load_task
    from gemmalab.evaluate.harness import model_identity, summary_lines
    from gemmalab.evaluate.sandbox import Limits
    from gemmalab.inference import Engine

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise GemmalabError("--tasks names no task.")
    if args.limit is not None and args.limit < 1:
        raise GemmalabError(f"--limit must be >= 1, got {args.limit}.")
    tasks = [load_task(n, args.data_dir) for n in names]  # bad task files fail before the model loads
    model, tokenizer = load_runtime_model(args)
    engine = Engine(model, require_tokenizer(tokenizer, args.model), max_batch_size=args.batch_size)
    result = evaluate(engine, tasks, args.out, model=str(args.model), limit=args.limit, seed=args.seed,
                      allow_code_execution=args.allow_code_execution, sandbox_limits=Limits(timeout_s=args.code_timeout),
                      model_identity=model_identity(args.model, args.dtype, args.quantize))
    for line in summary_lines(result, [t.name for t in tasks]):
        print(line)
    print(f"wrote {args.out / 'result.json'} and per-sample records in {args.out / 'samples'}")
