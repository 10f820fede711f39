"""Quality and decode speed of weight-only quantization on the real Gemma 3 270M, in one process.

    .venv/bin/python bench/quant_quality.py [--tokens 2048] [--ctx 512] [--new-tokens 128] [--threads 2]

Modes: fp32, bf16, int8 (f32 and bf16 activations), int4 (group 128, on an f32 and a bf16 model; the
int4 matmul itself always runs on bf16 activations) re-quantized from the dequantized file, and int4gguf: the
file's own Q4_K grid kept (`gemmalab.load(..., quantize="int4")`), its other matrices int8. Perplexity is over a fixed English text that every
CPython ships (the Zen of Python and the `pydoc_data.topics` help texts, so it depends only on the Python
version), cut into segments of --ctx tokens, each starting with BOS. Decode speed: greedy continuation of
one prompt at batch 1 with `gemmalab.generate` (stop_ids=()), new tokens over wall time of the whole call
(prefill included), best of --repeats runs after a short warm-up. `same_as_fp32` counts the leading new
tokens equal to the fp32 model's.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import copy
import io
import json
import math
import platform
import time

import torch
import torch.nn.functional as F

import gemmalab
from gemmalab.checkpoint import resolve
from gemmalab.checkpoint.gguf import gguf_int4_codes, open_gguf
from gemmalab.dtypes import cpu_description
from gemmalab.model.quant import quantize

PROMPT = "The history of the printing press begins"
# (name, model dtype, quantization mode or None)
MODES = [
    ("fp32", torch.float32, None),
    ("bf16", torch.bfloat16, None),
    ("int8-fp32", torch.float32, "int8"),
    ("int8-bf16", torch.bfloat16, "int8"),
    ("int4-fp32", torch.float32, "int4"),
    ("int4-bf16", torch.bfloat16, "int4"),
    # the file's own Q4_K grid for its Q4_K matrices, int8 for the rest (stored in Q5_0, Q6_K, Q8_0)
    ("int4gguf-fp32", torch.float32, "int4-gguf"),
    ("int4gguf-bf16", torch.bfloat16, "int4-gguf"),
]


def eval_text() -> str:
    """Deterministic English prose from the standard library: the Zen of Python, then pydoc's help topics."""
    from pydoc_data.topics import topics

    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this

    zen = codecs.decode(this.s, "rot13")
    return "\n\n".join([zen] + [topics[key] for key in sorted(topics)])


def eval_segments(tokenizer, n_tokens: int, ctx: int) -> list[list[int]]:
    """The first n_tokens of the text (without BOS), as segments of ctx tokens each with BOS prepended."""
    ids = tokenizer.encode(eval_text(), bos=False)[:n_tokens]
    return [[tokenizer.bos_id] + ids[i:i + ctx - 1] for i in range(0, len(ids), ctx - 1)]


@torch.no_grad()
def perplexity(model, segments: list[list[int]]) -> float:
    """exp(mean next-token NLL) over every position of every segment (the BOS is never a target)."""
    total, count = 0.0, 0
    for seg in segments:
        ids = torch.tensor([seg])
        logits = model(ids[:, :-1])[0].float()  # [T-1, V]
        total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += len(seg) - 1
    return math.exp(total / count)


def decode_speed(model, tokenizer, n: int, repeats: int) -> tuple[float, list[int]]:
    """(new tokens / s, the new ids) of a greedy continuation of PROMPT; best of `repeats` after a warm-up."""
    ids = tokenizer.encode(PROMPT)
    gemmalab.generate(model, tokenizer, [ids], max_new_tokens=8, stop_ids=())  # warm-up
    best, out = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        out = gemmalab.generate(model, tokenizer, [ids], max_new_tokens=n, stop_ids=())[0].ids
        best = min(best, time.perf_counter() - start)
    return n / best, out


def model_mb(model) -> float:
    """Bytes of all parameters and buffers (the full-precision embedding table included), in MiB."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def _leading_equal(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2048, help="evaluation text length in tokens")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per perplexity segment, BOS included")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--modes", default=",".join(m[0] for m in MODES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base, tokenizer = gemmalab.load("gemma3-270m")
    segments = eval_segments(tokenizer, args.tokens, args.ctx)
    results = {"machine": cpu_description(), "threads": args.threads,
               "torch": torch.__version__, "python": platform.python_version(),
               "eval_tokens": sum(len(s) - 1 for s in segments), "ctx": args.ctx, "new_tokens": args.new_tokens,
               "group_size": args.group_size, "modes": {}}
    print(f"{'mode':10s} {'ppl':>8s} {'tok/s':>7s} {'same_as_fp32':>12s} {'MiB':>7s} {'ppl_s':>6s}")
    fp32_ids = None
    wanted = args.modes.split(",")
    native = gguf_int4_codes(open_gguf(resolve("gemma3-270m"))) if "int4gguf" in args.modes else None
    for name, dtype, mode in MODES:
        if name not in wanted:
            continue
        model = copy.deepcopy(base).to(dtype)
        if mode == "int4-gguf":
            quantize(model, "int4", native=native)
        elif mode is not None:
            quantize(model, mode, args.group_size)
        start = time.perf_counter()
        ppl = perplexity(model, segments)
        ppl_s = time.perf_counter() - start
        tok_s, ids = decode_speed(model, tokenizer, args.new_tokens, args.repeats)
        fp32_ids = ids if name == "fp32" else fp32_ids
        same = _leading_equal(ids, fp32_ids) if fp32_ids is not None else None
        row = {"ppl": round(ppl, 3), "tok_s": round(tok_s, 1), "same_as_fp32": same, "mib": round(model_mb(model)),
               "ppl_s": round(ppl_s, 1)}
        results["modes"][name] = row
        print(f"{name:10s} {ppl:8.3f} {tok_s:7.1f} {str(same):>12s} {row['mib']:7d} {ppl_s:6.1f}", flush=True)
        del model
    print(json.dumps(results))


if __name__ == "__main__":
    main()
