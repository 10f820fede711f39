"""Batch-1 decode speed of a preset with random weights, as achieved memory bandwidth against the device's
measured copy bandwidth ([infer] GPU check: gemma-2b in bf16, target >= 70%).

    .venv/bin/python bench/decode_bandwidth.py --preset gemma-2b --device cuda [--dtype bfloat16 --new-tokens 128 --compile]

A decode step reads every weight once (the tied embedding in full, for the output projection) plus the KV cache
so far; bytes per token x tok/s is the achieved bandwidth. Copy bandwidth: a 1 GiB device-to-device copy, bytes
read + written per second (what `bandwidthTest`-style tools report). Runs on CPU too (tests use a tiny preset).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from gemmalab.inference import Engine, SamplingParams
from gemmalab.model import Gemma, get_preset


class _IdTokenizer:
    """Ids in, ids out: the benchmark feeds token ids and needs no vocabulary."""

    stop_ids = ()

    def decode(self, ids):
        return "".join(f" {i}" for i in ids)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes read + written per second by a device-to-device copy (best of `repeats`)."""
    x = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    y.copy_(x)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        y.copy_(x)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * x.numel() * 4 / best


def measure(preset: str, device: str = "cuda", dtype: str = "bfloat16", new_tokens: int = 128, prompt_len: int = 16,
            compile: bool = False, copy_gib: float = 1.0) -> dict:
    """tok/s of a greedy batch-1 generation (prefill included) and the bandwidth it achieves."""
    dev, dt = torch.device(device), getattr(torch, dtype)
    config = get_preset(preset)
    with torch.device("meta"):
        model = Gemma(config)
    model = model.to_empty(device=dev).to(dt)
    with torch.no_grad():
        for name, p in model.named_parameters():  # random weights, norms at zero (scale 1)
            p.zero_() if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    engine = Engine(model, _IdTokenizer(), max_batch_size=1, compile=compile)
    prompt = [2] + [int(t) for t in torch.randint(3, config.vocab_size, (prompt_len - 1,))]
    params = SamplingParams(max_new_tokens=new_tokens, stop_ids=())
    engine.generate([prompt], params)  # warm-up (and compilation)
    best = float("inf")
    for _ in range(2):
        _sync(dev)
        start = time.perf_counter()
        engine.generate([prompt], params)
        _sync(dev)
        best = min(best, time.perf_counter() - start)
    tok_s = new_tokens / best
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # K and V of every layer, read each step: on average half the final context (prefix + new tokens)
    kv_per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * dt.itemsize
    avg_context = prompt_len + new_tokens / 2
    bytes_per_token = weight_bytes + kv_per_token * avg_context
    copy = copy_bandwidth(dev, copy_gib)
    achieved = bytes_per_token * tok_s
    return {"preset": preset, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "dtype": dtype, "compile": compile, "new_tokens": new_tokens, "tok_s": round(tok_s, 1),
            "bytes_per_token": int(bytes_per_token), "achieved_gb_s": round(achieved / 1e9, 1),
            "copy_gb_s": round(copy / 1e9, 1), "fraction_of_copy": round(achieved / copy, 3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gemma-2b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    print(json.dumps(measure(args.preset, args.device, args.dtype, args.new_tokens, compile=args.compile)))


if __name__ == "__main__":
    main()
