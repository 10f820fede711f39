"""Peak memory of one training step (forward + backward) of a gemma-2b-shaped model: plain vs chunked loss.

Each variant runs in a fresh subprocess, so peaks do not leak between them. CUDA: peak of
torch.cuda.max_memory_allocated. CPU: the process's peak resident set (ru_maxrss), which also counts
torch itself and the weights; the step's own increment over the resident set just before the step
is reported beside it.

Usage: .venv/bin/python bench/train_memory.py [--layers 2] [--seq 2048] [--batch 1] [--device cpu]
`--layers 2` keeps the gemma-2b shapes (256k vocabulary, d=2048, ffn 16384) but only 2 of its 18
layers, so that one step fits in a 24 GB CPU box; the loss part, which is what differs, is unchanged.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_variant(variant: str, layers: int, seq: int, batch: int, device: str, chunk_mb: int) -> dict:
    """One forward + backward in this process; returns the memory figures."""
    import torch

    from gemmalab.model.config import get_preset
    from gemmalab.model.gemma import Gemma
    from gemmalab.train.loss import lm_loss, plain_cross_entropy

    torch.manual_seed(0)
    config = get_preset("gemma-2b").replace(n_layers=layers)
    with torch.device("meta"):
        model = Gemma(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    with torch.no_grad():  # in-place init in bf16: no fp32 copy of the 1 GB embedding inflates the peak
        for name, p in model.named_parameters():
            p.zero_() if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)
    tokens_in, targets = tokens[:, :-1], tokens[:, 1:]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
    t0 = time.perf_counter()
    if variant == "chunked":
        out = lm_loss(model, tokens_in, targets, chunk_bytes=chunk_mb * 2**20)
    else:  # the plain reference: the full [B*T, V] logits in fp32
        hidden = model(tokens_in, return_hidden=True)
        out = plain_cross_entropy(hidden.reshape(-1, config.dim), model.embed.weight, targets.reshape(-1),
                                  softcap=config.final_softcap)
    out.loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {
        "variant": variant, "loss": float(out.loss), "seconds": round(time.perf_counter() - t0, 1),
        "peak_gb": peak / 1e9, "before_step_gb": before / 1e9, "step_increment_gb": (peak - before) / 1e9,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chunk-mb", type=int, default=256, help="fp32 logits per loss chunk (train.loss_chunk_mb)")
    ap.add_argument("--variant", choices=["plain", "chunked"], help="internal: run one variant and print JSON")
    args = ap.parse_args()
    if args.variant:
        import torch

        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        print(json.dumps(run_variant(args.variant, args.layers, args.seq, args.batch, args.device, args.chunk_mb)))
        return
    results = {}
    for variant in ("plain", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant, "--layers", str(args.layers), "--seq", str(args.seq),
               "--batch", str(args.batch), "--device", args.device, "--chunk-mb", str(args.chunk_mb)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    import torch

    print(f"gemma-2b shapes, {args.layers} layers, bf16, batch {args.batch} x seq {args.seq}, device {args.device}, "
          f"torch {torch.__version__}, loss chunks of {args.chunk_mb} MiB")
    print("| loss | peak GB | step increment GB | loss value | step s |")
    print("|---|---|---|---|---|")
    for r in results.values():
        print(f"| {r['variant']} | {r['peak_gb']:.2f} | {r['step_increment_gb']:.2f} | {r['loss']:.4f} | {r['seconds']} |")
    p, c = results["plain"], results["chunked"]
    print(f"peak reduction: {100 * (1 - c['peak_gb'] / p['peak_gb']):.1f}% "
          f"(step increment: {100 * (1 - c['step_increment_gb'] / p['step_increment_gb']):.1f}%)")


if __name__ == "__main__":
    main()
