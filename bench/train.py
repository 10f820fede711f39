"""Training-step speed: gemmalab's step against transformers' GemmaForCausalLM with a plain AdamW loop.

    .venv/bin/python bench/train.py [--steps 3] [--dtype fp32|bf16] [--threads 2] [--compile] [--chunk-mb 256]
        [--allocator default|keep | --own-process]

Same config for both (4 layers, d 512, 8 heads / 1 KV head of 64, FFN 2048, vocabulary 32,000, seq 512,
batch 2), same random batches, fp32 weights (bf16: autocast for both). Ours: `lm_loss` over the tied
embedding (the fused loss; here all 1,024 rows' logits, 125 MiB, fit its 256 MiB chunk; `--chunk-mb 16` splits
them into chunks of 128 rows), fused/foreach AdamW from gemmalab.train.optim. Theirs: `model(input_ids, labels=...)` and
torch.optim.AdamW. tokens/s: best of 3 alternating rounds of --steps steps each, after 2 warm-up steps.

Host memory (gemmalab.host_memory): by default glibc hands the step's large buffers back to the kernel and page-faults
them in again on the next step, in both frameworks. `--allocator keep` keeps freed memory in the process for both
(like for like); `--own-process` runs each framework in processes of its own, alternating, as each runs out of the
box: ours as the trainer runs it (train.keep_freed_memory, on by default), theirs with glibc's defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from gemmalab.host_memory import keep_freed_memory
from gemmalab.model import Gemma, ModelConfig
from gemmalab.train.loss import lm_loss
from gemmalab.train.optim import OptimConfig, build_optimizer

CONFIG = ModelConfig(vocab_size=32_000, dim=512, n_layers=4, n_heads=8, n_kv_heads=1, head_dim=64, ffn_dim=2048,
                     max_seq_len=512)


def seconds_per_step(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def best_alternating(measure_a, measure_b, rounds: int = 3) -> tuple[float, float]:
    """The smallest of `rounds` alternating calls of each measurement: this machine's speed drifts by 20-30% (at
    times 3x) over minutes, so the two are timed side by side rather than one after the other."""
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, measure in enumerate((measure_a, measure_b)):
            best[i] = min(best[i], measure())
    return best[0], best[1]


def build_step(which: str, args: argparse.Namespace):
    """One training step of `which` ("ours" or "theirs") on the same seeded batch: a function of no arguments."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CONFIG.vocab_size, (args.batch, args.seq + 1), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else contextlib.nullcontext
    if which == "ours":
        ours = Gemma(CONFIG)
        ours.init_weights(seed=0)
        if args.compile:
            from gemmalab.train.parallel import parallelize

            parallelize(ours, world_size=1, mixed_precision=False, activation_checkpointing=False, compile=True,
                        device="cpu")
        opt = build_optimizer(ours, OptimConfig(lr=1e-4, total_steps=100))

        def our_step():
            with amp():
                loss = lm_loss(ours, inputs, targets, chunk_bytes=args.chunk_mb * 2**20).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return our_step

    import transformers

    hf_config = transformers.GemmaConfig(vocab_size=CONFIG.vocab_size, hidden_size=CONFIG.dim, intermediate_size=CONFIG.ffn_dim,
                                         num_hidden_layers=CONFIG.n_layers, num_attention_heads=CONFIG.n_heads,
                                         num_key_value_heads=CONFIG.n_kv_heads, head_dim=CONFIG.head_dim,
                                         max_position_embeddings=CONFIG.max_seq_len, hidden_act="gelu_pytorch_tanh")
    theirs = transformers.GemmaForCausalLM(hf_config).train()
    hf_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-4, weight_decay=0.1)

    def their_step():
        with amp():
            logits = theirs(input_ids=inputs).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)

    return their_step


def worker_seconds(which: str, args: argparse.Namespace) -> float:
    """Seconds per step of `which` in a fresh process of its own (ours with the trainer's host-memory setting), after
    2 warm-up steps."""
    cmd = [sys.executable, __file__, "--worker", which, "--steps", str(args.steps), "--batch", str(args.batch),
           "--seq", str(args.seq), "--dtype", args.dtype, "--threads", str(args.threads), "--chunk-mb", str(args.chunk_mb)]
    if args.compile:
        cmd.append("--compile")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile our blocks (as train.compile does)")
    parser.add_argument("--chunk-mb", type=int, default=256, help="fp32 logits per loss chunk (train.loss_chunk_mb)")
    parser.add_argument("--allocator", default="default", choices=["default", "keep"],
                        help="keep: glibc keeps freed memory, for both frameworks (gemmalab.host_memory)")
    parser.add_argument("--own-process", action="store_true",
                        help="each framework in processes of its own, as each runs by default")
    parser.add_argument("--worker", choices=["ours", "theirs"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:  # one framework, one process: 2 warm-up steps, then print the seconds per step
        if args.worker == "ours":
            keep_freed_memory()
        step = build_step(args.worker, args)
        for _ in range(2):
            step()
        print(seconds_per_step(step, args.steps))
        return
    if args.own_process:
        t_ours, t_theirs = best_alternating(lambda: worker_seconds("ours", args), lambda: worker_seconds("theirs", args))
        allocator = "ours keep, theirs default (own processes)"
    else:
        if args.allocator == "keep":
            keep_freed_memory()
        ours, theirs = build_step("ours", args), build_step("theirs", args)
        for _ in range(2):
            ours(), theirs()
        t_ours, t_theirs = best_alternating(lambda: seconds_per_step(ours, args.steps),
                                            lambda: seconds_per_step(theirs, args.steps))
        allocator = args.allocator

    import transformers

    n_tokens = args.batch * args.seq
    result = {"machine": f"{platform.machine()} {args.threads} threads", "torch": torch.__version__,
              "transformers": transformers.__version__, "dtype": args.dtype, "batch": args.batch, "seq": args.seq,
              "ours_tok_s": round(n_tokens / t_ours, 1), "transformers_tok_s": round(n_tokens / t_theirs, 1),
              "ratio": round(t_theirs / t_ours, 2), "compile": args.compile, "chunk_mb": args.chunk_mb,
              "allocator": allocator}
    print(f"{args.dtype}: gemmalab {result['ours_tok_s']} tok/s, transformers {result['transformers_tok_s']} tok/s, "
          f"ratio {result['ratio']}x ({allocator})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
