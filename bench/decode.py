"""Decode speed: gemmalab against transformers on the real Gemma 3 270M, batch 1, in one process.

    .venv/bin/python bench/decode.py [--new-tokens 128] [--threads 2] [--dtypes float32,bfloat16]

Both load the same GGUF file (dequantized to the same dtype) and decode the same greedy continuation of
the same prompt; tokens/s counts new tokens over wall time of the whole generate call (prefill included),
best of --repeats runs after one warm-up. Also reports the load time of the GGUF.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import gemmalab

PROMPT = "The history of the printing press begins"


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    path = gemmalab.checkpoint.resolve("gemma3-270m")
    start = time.perf_counter()
    model, tokenizer = gemmalab.load(path)
    load_s = time.perf_counter() - start
    ids = tokenizer.encode(PROMPT)
    n = args.new_tokens
    results = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "new_tokens": n,
               "torch": torch.__version__, "transformers": transformers.__version__, "gemmalab_load_s": round(load_s, 2)}
    print(f"gemmalab load of the 270M GGUF (weights + tokenizer): {load_s:.1f} s")

    start = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    results["transformers_load_s"] = round(time.perf_counter() - start, 2)

    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        ours, theirs = model.to(dtype), hf.to(dtype)
        out_ours = {}

        def run_ours():
            out_ours["ids"] = gemmalab.generate(ours, tokenizer, [ids], max_new_tokens=n, stop_ids=())[0].ids

        def run_theirs():
            with torch.no_grad():
                out = theirs.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
            out_ours["hf"] = out[0, len(ids):].tolist()

        t_ours, t_theirs = _time(run_ours, args.repeats), _time(run_theirs, args.repeats)
        same = out_ours["ids"] == out_ours["hf"]
        row = {"ours_tok_s": round(n / t_ours, 1), "transformers_tok_s": round(n / t_theirs, 1),
               "ratio": round(t_theirs / t_ours, 2), "same_tokens": same}
        results[dtype_name] = row
        print(f"{dtype_name:9s} gemmalab {row['ours_tok_s']:6.1f} tok/s   transformers {row['transformers_tok_s']:6.1f} tok/s"
              f"   ratio {row['ratio']:.2f}x   identical tokens: {same}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
