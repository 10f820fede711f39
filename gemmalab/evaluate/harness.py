"""Runs tasks over the inference engine: batched log-likelihood and generation requests, one JSONL record per
sample (prompt, output, score) written as it goes, so an interrupted run resumes where it stopped, and a
`result.json` with each task's figures."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import zlib
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from gemmalab.errors import GemmalabError
from gemmalab.evaluate.metrics import pass_at_k
from gemmalab.evaluate.requests import generate_until, loglikelihoods
from gemmalab.evaluate.tasks.base import Sample, Task
from gemmalab.inference import Engine
from gemmalab.runs import RunDir, keep_settings


def evaluate(engine: Engine, tasks: list[Task], out: str | Path, *, model: str = "", limit: int | None = None,
             allow_code_execution: bool = False, seed: int = 1234, sandbox_limits=None,
             progress: bool = True, model_identity: dict | None = None) -> dict:
    """Evaluate every task, write `out/samples/TASK.jsonl` and `out/result.json`, and return the result.

    `limit` keeps the first N samples of each task. Code tasks (HumanEval, MBPP) run model-written programs in
    the bubblewrap sandbox and refuse to start without `allow_code_execution`. Re-running with the same
    arguments skips the samples already recorded; other settings for the same `out` are refused. `model` names
    the model; `model_identity` says what else makes its outputs (`model_identity(...)`: the weights' files, dtype,
    quantization), so that records of changed weights or settings are refused rather than mixed with new ones.
    """
    out = Path(out)
    for task in tasks:  # refuse before spending time on any task
        if task.check_program is not None:
            if not allow_code_execution:
                raise GemmalabError(f"Task {task.name} runs model-written code. Pass --allow-code-execution to run it "
                                    f"in the sandbox (bubblewrap: no network, read-only files, limits; docs/evaluate.md).")
            from gemmalab.evaluate.sandbox import check_available

            check_available()
    run = RunDir(out, "eval")
    run.snapshot({"model": model, "tasks": [t.name for t in tasks], "limit": limit, "seed": seed,
                  "allow_code_execution": allow_code_execution})
    results = {}
    for task in tasks:
        started = time.perf_counter()
        samples = task.samples[:limit] if limit is not None else task.samples
        records = _run_task(engine, task, samples, run, model, seed, sandbox_limits, progress, model_identity)
        results[task.name] = _summarize(task, samples, records) | {"seconds": round(time.perf_counter() - started, 1)}
    headline = {name: {r["metric"]: r["value"]} for name, r in results.items()}
    old = run.result()
    same = old is not None and old.get("model") == model and old.get("model_identity") == model_identity
    if same:  # tasks evaluated earlier into this directory, by this same model, stay in it
        headline, results = old.get("headline", {}) | headline, old.get("tasks", {}) | results
    run.write_result("finished", {"model": model, "model_identity": model_identity, "limit": limit,
                                  "headline": headline, "tasks": results})
    return run.result()


def summary_lines(result: dict, names: list[str] | None = None) -> list[str]:
    """One line per task of an eval result (those named, else all): name, metric, value and sample count."""
    tasks = result["tasks"]
    return [f"{name:<16} {tasks[name]['metric']:<12} {tasks[name]['value']:.4f}  (n={tasks[name]['n']})"
            for name in (names if names is not None else tasks)]


def model_identity(ref: str | Path, dtype, quantize: str | None) -> dict:
    """What, besides its name, makes a model's outputs: the weights' files (names, sizes and modification times:
    rewritten weights differ), the dtype and the quantization."""
    from gemmalab.checkpoint import resolve
    from gemmalab.dtypes import dtype_name
    from gemmalab.files import stamp

    return {"weights": stamp(resolve(ref)), "dtype": dtype_name(dtype), "quantize": quantize}


def _fingerprint(task: Task, samples: list[Sample], model: str, seed: int, identity: dict | None,
                 sandbox_limits) -> dict:
    """What a task's records depend on: the model, the task's definition (inputs, golds, scoring settings) and, for
    code tasks, the sandbox's limits (a longer timeout passes other programs)."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(json.dumps([s.id, s.prompt, s.choices, s.contexts, s.gold, s.data], ensure_ascii=False,
                                 default=str).encode())
    meta = {"model": model, "model_identity": identity, "task": task.name, "samples": len(samples),
            "inputs_sha256": digest.hexdigest()[:16], "metric": task.metric, "target_delimiter": task.target_delimiter,
            "num_samples": task.num_samples, "temperature": task.temperature, "max_new_tokens": task.max_new_tokens,
            "stop": list(task.stop), "pass_k": list(task.pass_k), "info": json.loads(json.dumps(task.info, default=str)),
            "seed": seed}
    if task.check_program is not None:
        from gemmalab.evaluate.sandbox import Limits

        meta["sandbox_limits"] = dataclasses.asdict(sandbox_limits or Limits())
    return meta


def _run_task(engine, task, samples, run: RunDir, model, seed, sandbox_limits, progress, identity) -> list[dict]:
    folder = run.path / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    path, meta_path = folder / f"{task.name}.jsonl", folder / f"{task.name}.meta.json"
    meta = _fingerprint(task, samples, model, seed, identity, sandbox_limits)
    keep_settings(meta_path, meta, [path], f"{path} holds a run", "that file to start this task again")
    with run.records(f"samples/{task.name}") as records:
        pending = [s for s in samples if s.id not in records.done]
        if task.kind == "generate":  # similar lengths batch together: less padding
            pending.sort(key=lambda s: len(s.prompt), reverse=True)
        per_chunk = engine.max_batch_size if task.kind == "generate" else max(1, 4 * engine.max_batch_size // max(
            1, len(samples[0].choices if samples[0].contexts is None else samples[0].contexts)))
        bar = tqdm(total=len(samples), initial=len(samples) - len(pending), desc=task.name, unit="sample",
                   disable=not progress, dynamic_ncols=True)
        for start in range(0, len(pending), per_chunk):
            chunk = pending[start:start + per_chunk]
            if task.kind == "choice":
                records.append(_choice_records(engine, task, chunk))
            else:
                records.append(_generate_records(engine, task, chunk, seed, sandbox_limits))
            bar.update(len(chunk))
        bar.close()
        return [records.done[s.id] for s in samples]


def choice_pairs(task: Task, s: Sample) -> list[tuple[str, str]]:
    """The (context, continuation) pairs scored for one choice sample, one per choice (lm-eval's requests)."""
    if s.contexts is None:
        return [(s.prompt, task.target_delimiter + c) for c in s.choices]
    return [(c, task.target_delimiter + s.choices[0]) for c in s.contexts]  # partial scoring: one continuation


def _choice_records(engine: Engine, task: Task, chunk: list[Sample]) -> list[dict]:
    pairs, spans = [], []
    for s in chunk:
        items = choice_pairs(task, s)
        spans.append((len(pairs), len(pairs) + len(items)))
        pairs += items
    scores = loglikelihoods(engine, pairs)
    records = []
    for s, (a, b) in zip(chunk, spans):
        lls = [ll for ll, _ in scores[a:b]]
        lengths = [len(c) for c in (s.choices if s.contexts is None else s.contexts)]
        pred = max(range(len(lls)), key=lls.__getitem__)
        pred_norm = max(range(len(lls)), key=lambda i: lls[i] / lengths[i])
        records.append({"id": s.id, "prompt": s.prompt, "choices": s.choices, "contexts": s.contexts, "gold": s.gold,
                        "loglikelihoods": lls, "pred": pred,
                        "metrics": {"acc": float(pred == s.gold), "acc_norm": float(pred_norm == s.gold)}})
    return records


def _generate_records(engine: Engine, task: Task, chunk: list[Sample], seed: int, sandbox_limits) -> list[dict]:
    n = task.num_samples
    prompts = [s.prompt for s in chunk for _ in range(n)]
    # a seed per (sample, draw), independent of batching and of resumption
    seeds = [zlib.crc32(f"{seed}/{s.id}/{j}".encode()) for s in chunk for j in range(n)]
    texts = generate_until(engine, prompts, task.stop, task.max_new_tokens, task.temperature, seeds=seeds)
    outputs = [[{"text": t} for t in texts[i * n:(i + 1) * n]] for i in range(len(chunk))]
    if task.check_program is not None:
        from gemmalab.evaluate.sandbox import Limits, run_many

        programs = [task.check_program(s, o["text"]) for s, outs in zip(chunk, outputs) for o in outs]
        runs = run_many(programs, sandbox_limits or Limits())
        for o, run in zip((o for outs in outputs for o in outs), runs):
            o.update(passed=run.passed, status=run.status, stderr=run.stderr[-500:])
    records = []
    for s, outs in zip(chunk, outputs):
        if task.check_program is not None:
            c = sum(o["passed"] for o in outs)
            metrics = {f"pass@{k}": pass_at_k(n, c, k) for k in task.pass_k if k <= n}
        else:
            per = [task.score(s, o["text"]) for o in outs]
            for o, m in zip(outs, per):
                o["metrics"] = m
            metrics = {k: sum(m[k] for m in per) / n for k in per[0]}
        records.append({"id": s.id, "prompt": s.prompt, "gold": s.gold, "outputs": outs, "metrics": metrics})
    return records


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _summarize(task: Task, samples: list[Sample], records: list[dict]) -> dict:
    """Micro-averages over samples, overall and per group (e.g. MMLU category and subject)."""
    names = list(records[0]["metrics"]) if records else []
    metrics = {k: _mean([r["metrics"][k] for r in records]) for k in names}
    summary = {"metric": task.metric, "value": metrics.get(task.metric, math.nan), "n": len(records),
               "metrics": metrics, "protocol": task.info}
    if task.groups is not None:
        by_group = defaultdict(list)
        for s, r in zip(samples, records):
            for g in task.groups(s):
                by_group[g].append(r)
        summary["groups"] = {g: {"n": len(rs)} | {k: _mean([r["metrics"][k] for r in rs]) for k in names}
                             for g, rs in sorted(by_group.items())}
    return summary
