"""Decode speed on the real Gemma 3 270M, batch 1 and batched, against transformers and llama.cpp, in one run.

    .venv/bin/python bench/decode.py [--new-tokens 128] [--threads 2] [--modes ...] [--batch 32 --batch-new-tokens 64]

Modes: ours-fp32, ours-bf16, ours-auto (the dtype `auto` picks here), ours-int8, ours-int4 (gemmalab.Engine;
int8/int4: weight-only quantization of every linear layer and the output projection, re-quantized from the
dequantized file, activations in --quant-dtype, auto by default; the int4 matmul itself runs on bf16), ours-int4gguf
(the file's own Q4_K grid for its Q4_K matrices, int8 for the others: `gemmalab.load(..., quantize="int4")`), each
also as `...-compile` (torch.compile of the decode step; the compile happens in the warm-up), hf-fp32, hf-bf16 (transformers loading the same GGUF), llama
(llama-cpp-python on the same Q4_K_M GGUF; `pip install llama-cpp-python`, which builds llama.cpp, minutes).
tok/s counts new tokens over the wall time of a whole greedy generation (prefill included), best of
--repeats after one warm-up. Batched: --batch prompts of different lengths, --batch-new-tokens each, total tok/s.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import gemmalab
from gemmalab.inference import Engine, SamplingParams
from gemmalab.checkpoint.gguf import gguf_int4_codes, open_gguf
from gemmalab.dtypes import DTYPE_CHOICES, cpu_description, dtype_name, parse_dtype
from gemmalab.model.quant import quantize

PROMPT = "The history of the printing press begins"
ALL_MODES = ("ours-fp32,ours-bf16,ours-auto,ours-int8,ours-int4,ours-int4gguf,ours-bf16-compile,ours-int8-compile,"
             "ours-int4-compile,hf-fp32,hf-bf16,llama")


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def ours(model, tokenizer, mode: str, quant_dtype: torch.dtype, native: dict):
    """The engine for one of our modes (copies: each mode gets its own weights)."""
    kind = mode.removeprefix("ours-").removesuffix("-compile")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "auto": parse_dtype("auto")}.get(kind, quant_dtype)
    m = copy.deepcopy(model).to(dtype)
    if kind in ("int8", "int4"):
        m = quantize(m, kind)
    elif kind == "int4gguf":
        m = quantize(m, "int4", native=native)
    return Engine(m, tokenizer, max_batch_size=64, compile=mode.endswith("-compile"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--modes", default=ALL_MODES)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batch-new-tokens", type=int, default=64)
    parser.add_argument("--batch-modes", default="ours-fp32,ours-bf16,ours-auto,ours-int8,ours-int4,ours-int4gguf")
    parser.add_argument("--quant-dtype", default="auto", choices=DTYPE_CHOICES,
                        help="activations of the int8 and int4 modes (int4's matmul itself always runs on bf16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.new_tokens

    path = gemmalab.checkpoint.resolve("gemma3-270m")
    start = time.perf_counter()
    model, tokenizer = gemmalab.load(path)
    # the file's Q4 codes, read only when a mode uses them
    native = gguf_int4_codes(open_gguf(path)) if "int4gguf" in args.modes + args.batch_modes else {}
    quant_dtype = parse_dtype(args.quant_dtype)
    results = {"machine": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "auto": dtype_name(parse_dtype("auto")), "quant_dtype": dtype_name(quant_dtype),
               "new_tokens": n, "gemmalab_load_s": round(time.perf_counter() - start, 2), "batch1": {}, "batched": {}}
    print(f"CPU: {results['machine']}, {results['threads']} threads, torch {torch.__version__}; dtype auto here: "
          f"{results['auto']}; int8/int4 activations: {results['quant_dtype']}")
    print(f"gemmalab load of the 270M GGUF (weights + tokenizer): {results['gemmalab_load_s']:.1f} s")
    ids = tokenizer.encode(PROMPT)
    greedy = SamplingParams(max_new_tokens=n, stop_ids=())

    hf = None
    for mode in args.modes.split(","):
        if mode.startswith("ours"):
            engine = ours(model, tokenizer, mode, quant_dtype, native)
            run = lambda: engine.generate([ids], greedy)  # noqa: E731
        elif mode.startswith("hf"):
            import transformers

            if hf is None:
                hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                      dtype=torch.float32).eval()
                results["transformers"] = transformers.__version__
            hf_model = hf.to(torch.bfloat16 if mode == "hf-bf16" else torch.float32)

            def run():
                with torch.no_grad():
                    hf_model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        elif mode == "llama":
            import llama_cpp

            llm = llama_cpp.Llama(model_path=str(path), n_threads=args.threads, n_ctx=512, verbose=False)
            results["llama_cpp"] = llama_cpp.__version__
            prompt_tokens = llm.tokenize(PROMPT.encode(), add_bos=True)

            def run():
                llm.reset()
                for i, _ in enumerate(llm.generate(prompt_tokens, temp=0.0, reset=True)):
                    if i + 1 == n:
                        break
        else:
            raise SystemExit(f"unknown mode {mode}; modes: {ALL_MODES}")
        tok_s = n / best_time(run, args.repeats)
        results["batch1"][mode] = round(tok_s, 1)
        print(f"batch 1   {mode:10s} {tok_s:7.1f} tok/s", flush=True)

    lengths = [4 + (7 * i) % 40 for i in range(args.batch)]  # prompts of different lengths
    words = (PROMPT + " and the spread of books across Europe in the following centuries") .split()
    prompts = [" ".join((words * 8)[:k]) for k in lengths]
    for mode in filter(None, args.batch_modes.split(",")):
        engine = ours(model, tokenizer, mode, quant_dtype, native)
        params = SamplingParams(max_new_tokens=args.batch_new_tokens, stop_ids=())
        t = best_time(lambda: engine.generate(prompts, params), 1)
        tok_s = args.batch * args.batch_new_tokens / t
        ratio = tok_s / results["batch1"].get(mode, float("nan"))
        results["batched"][mode] = {"tok_s": round(tok_s, 1), "vs_batch1": round(ratio, 2)}
        print(f"batch {args.batch}  {mode:10s} {tok_s:7.1f} tok/s total ({ratio:.1f}x batch 1)", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
