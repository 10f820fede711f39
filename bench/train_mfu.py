"""Training throughput and MFU of the real trainer on random tokens ([train] GPU check: gemma-2b on one GPU, bf16,
seq 2048, FSDP2 with one rank, compile on; goal >= 50% MFU).

    .venv/bin/python bench/train_mfu.py --preset gemma-2b --seq 2048 --batch 2 [--steps 12 --warmup 4]
        [--no-compile] [--activation-checkpointing] [--device cuda]

Writes random token shards and a train config to a temporary folder, runs `torchrun --nproc-per-node 1 -m gemmalab
pretrain` (one process, so FSDP2 wraps the model with bf16 mixed precision, as on a cluster), then reads the run's
metrics.jsonl: tokens/s and MFU (the trainer's own formula and peak table) are medians over the steps after
--warmup (which hold the compilation). No end-of-run checkpoint or model export (checkpoint.at_end / export off).
Runs on CPU with gloo too (tests use a tiny preset).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from gemmalab.data.packing import PackMeta, ShardWriter
from gemmalab.model import get_preset


def write_random_shards(folder: Path, vocab_size: int, tokens: int, seq_len: int, seed: int = 0) -> None:
    """Documents of 1-4 rows of random ids (BOS 2 first, EOS 1 last), `tokens` in all, as one source."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(folder, PackMeta(tokenizer_fingerprint="random", vocab_size=vocab_size, bos_id=2, eos_id=1,
                                          seq_len=seq_len))
    written = 0
    while written < tokens:
        n = int(rng.integers(seq_len, 4 * seq_len))
        ids = rng.integers(3, vocab_size, n, dtype=np.uint32)
        ids[0], ids[-1] = 2, 1
        writer.add(ids, "random")
        written += n
    writer.close()


def config_text(preset: str, shards: Path, seq: int, batch: int, steps: int, compile: bool, checkpointing: bool,
                device: str, loss_chunk_mb: int = 256, peak_flops: float | None = None) -> str:
    peak = f"peak_flops = {peak_flops!r}" if peak_flops else "# peak_flops: the GPU's spec sheet, or measured on CPU"
    return f"""
[model]
preset = "{preset}"

[data]
shards = ["{shards}"]
batch_size = {batch}
seq_len = {seq}

[optim]
lr = 1e-4
warmup_steps = 2

[train]
steps = {steps}
dtype = "bf16"
compile = {str(compile).lower()}
activation_checkpointing = {str(checkpointing).lower()}
loss_chunk_mb = {loss_chunk_mb}
log_every = 1
device = "{device}"
{peak}

[checkpoint]
every = 0
at_end = false
export = false
"""


def measure(preset: str, seq: int, batch: int, steps: int, warmup: int, compile: bool = True,
            checkpointing: bool = False, device: str = "auto", workdir: Path | None = None,
            loss_chunk_mb: int = 256, peak_flops: float | None = None) -> dict:
    """Run the trainer under torchrun (one process) and return its figures (medians over steps after `warmup`)."""
    config = get_preset(preset)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        write_random_shards(tmp / "shards", config.vocab_size, (steps + 1) * batch * (seq + 1) * 2, seq)
        (tmp / "train.toml").write_text(config_text(preset, tmp / "shards", seq, batch, steps, compile, checkpointing,
                                                    device, loss_chunk_mb, peak_flops), encoding="utf-8")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "gemmalab", "pretrain", "--config", str(tmp / "train.toml"), "--out", str(tmp / "run")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0:
            raise SystemExit(f"the training run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        records = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        result = json.loads((tmp / "run" / "result.json").read_text())
    timed = [r for r in records if r.get("step", 0) > warmup and "tokens_per_s" in r]
    if not timed:
        raise SystemExit(f"no step after the {warmup} warm-up steps was logged; raise --steps")
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {
        "preset": preset, "seq_len": seq, "batch_size": batch, "compile": compile,
        "activation_checkpointing": checkpointing, "loss_chunk_mb": loss_chunk_mb, "device": result["device"], "world_size": result["world_size"],
        "steps_timed": len(timed), "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "mfu": statistics.median(mfus) if mfus else None,
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "peak_memory": {k: v for k, v in timed[-1].items() if "mem" in k},
        "final_loss": result["final_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gemma-2b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cuda or cpu")
    parser.add_argument("--loss-chunk-mb", type=int, default=256,
                        help="train.loss_chunk_mb: fp32 logits per loss chunk; when all rows fit (4096 for gemma-2b at "
                             "2 x 2048), the loss takes 3 output-projection matmuls instead of 4")
    args = parser.parse_args()
    r = measure(args.preset, args.seq, args.batch, args.steps, args.warmup, compile=not args.no_compile,
                checkpointing=args.activation_checkpointing, device=args.device, loss_chunk_mb=args.loss_chunk_mb)
    import torch

    if torch.cuda.is_available():
        r["gpu"] = torch.cuda.get_device_name()
    r["torch"] = torch.__version__
    print(json.dumps(r))


if __name__ == "__main__":
    main()
