"""The memorization audit of the Gemma report (`gemmalab memorization`, docs/memorization.md).

Sample documents from each source of a training corpus, prompt the model with `prefix` tokens of each (from the
start, or from a seeded random offset), and compare its greedy next `suffix` tokens with the document's own. A
sample is exactly memorized when all `suffix` tokens match, approximately memorized when the token-level edit
distance is at most `threshold` x suffix (10%: 5 of 50). Every memorized continuation is scanned for personal and
sensitive data (gemmalab.pii).

Speed without changing any result:
- the prefill computes logits at the last position only;
- decoding runs `batch_size` rows at once in a `RowCache`, each row at its own position: a row leaves as soon as
  a lower bound on its edit distance exceeds the threshold (then it is neither exact nor approximate), and a
  waiting sample takes its place at once, so the batch stays full;
- every row's numbers are independent of the others': its prefill runs alone and every decode step has the same
  batch shape, so pruning and scheduling cannot change a generated token (tested against the unpruned audit).

Run directory: config.toml, samples.jsonl (one record per sample; a resumed run continues it), memorized.jsonl
(the memorized samples with their PII spans), memorization.png, result.json (stage "memorization").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from gemmalab.errors import GemmalabError
from gemmalab.files import stamp, write_json
from gemmalab.runs import RunDir

__all__ = ["MemorizationConfig", "Sample", "load_corpus", "draw_samples", "audit", "memorization", "wilson",
           "edit_lower_bound", "classify", "SENSITIVE", "PERSONAL"]

SENSITIVE = ("SECRET", "CARD", "IBAN", "SSN")  # the report's "sensitive" data
PERSONAL = ("EMAIL", "PHONE", "IP")


@dataclass
class MemorizationConfig:
    model: str = "gemma3-270m"  # a model REF
    corpus: str = ""  # a token shard folder (meta.json) or JSONL documents {"text", "metadata": {"source"}}
    samples: int = 10000  # per source (fewer when a source has fewer usable documents)
    prefix: int = 50
    suffix: int = 50
    seed: int = 0
    offset: str = "start"  # "start" (as the report) or "random": a seeded offset inside each document
    threshold: float = 0.10  # approximate memorization: normalised token edit distance <= threshold
    prune: bool = True  # stop a row once it can be neither exact nor approximate (no distance for it then)
    batch_size: int = 64
    dtype: torch.dtype = torch.float32
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.corpus:
            raise GemmalabError("Name the corpus: --corpus PATH (token shards or JSONL documents).")
        for name in ("samples", "prefix", "suffix", "batch_size"):
            if getattr(self, name) < 1:
                raise GemmalabError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.offset not in ("start", "random"):
            raise GemmalabError(f"`offset` must be start or random, got {self.offset!r}.")
        if not 0 <= self.threshold < 1:
            raise GemmalabError(f"`threshold` must be in [0, 1), got {self.threshold}.")

    @property
    def max_distance(self) -> int:
        """The largest token edit distance that is still approximate memorization."""
        return int(math.floor(self.threshold * self.suffix + 1e-9))


@dataclass(frozen=True)
class Sample:
    id: str  # "source/document/offset"
    source: str
    document: str
    offset: int
    prompt: list[int]  # the prefix (without BOS; the audit puts BOS first)
    target: list[int]  # the true continuation


# ---- the corpus ------------------------------------------------------------------------------------------------


def load_corpus(path: str | Path, tokenizer) -> dict[str, list[tuple[str, np.ndarray]]]:
    """source -> [(document id, token ids without BOS/EOS)] of token shards (whose tokenizer must be the model's)
    or JSONL documents (tokenized here)."""
    path = Path(path)
    if path.is_dir():
        from gemmalab.data.packing import read_meta

        meta = read_meta(path)
        if meta.tokenizer_fingerprint != tokenizer.fingerprint():
            raise GemmalabError(f"{path / 'meta.json'}: the shards were made with another tokenizer (fingerprint "
                                f"{meta.tokenizer_fingerprint[:12]}, the model's is {tokenizer.fingerprint()[:12]}); "
                                "audit with the model they were made for, or pass the documents as JSONL.")
        out: dict[str, list] = defaultdict(list)
        for k, info in enumerate(meta.shards):
            tokens = np.memmap(path / info.tokens, dtype="<u4", mode="r") if info.num_tokens else np.zeros(0, "<u4")
            index = np.load(path / info.index)
            for d, (start, length, source) in enumerate(index):
                ids = tokens[start:start + length]
                if len(ids) and ids[0] == meta.bos_id:
                    ids = ids[1:]
                if len(ids) and ids[-1] == meta.eos_id:
                    ids = ids[:-1]
                out[meta.source_names[source]].append((f"{k}:{d}", ids))
        return dict(out)
    if not path.is_file():
        raise GemmalabError(f"Corpus not found: {path} (a token shard folder or a JSONL file).")
    from gemmalab.files import read_jsonl

    out = defaultdict(list)
    for line, obj in read_jsonl(path, required=("text",)):
        if not isinstance(obj["text"], str):
            raise GemmalabError(f"{path}, line {line}: `text` must be a string.")
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        source = str(meta.get("source", obj.get("source", "default")))
        ids = tokenizer.encode(obj["text"], bos=False, parse_special=False)
        out[source].append((str(obj.get("id", line)), np.asarray(ids, dtype=np.int64)))
    if not out:
        raise GemmalabError(f"{path} holds no documents.")
    return dict(out)


def draw_samples(corpus: dict[str, list[tuple[str, np.ndarray]]], cfg: MemorizationConfig
                 ) -> tuple[list[Sample], dict[str, dict]]:
    """Up to `samples` per source, seeded; documents shorter than prefix + suffix are skipped and counted.
    Returns the samples and per source {"documents", "too_short", "sampled"} (documents = too_short + usable)."""
    need = cfg.prefix + cfg.suffix
    samples, counts = [], {}
    for source in sorted(corpus):
        docs = corpus[source]
        usable = [(doc_id, ids) for doc_id, ids in docs if len(ids) >= need]
        rng = random.Random(f"{cfg.seed}/{source}")
        chosen = rng.sample(range(len(usable)), min(cfg.samples, len(usable)))
        for i in sorted(chosen):
            doc_id, ids = usable[i]
            offset = 0 if cfg.offset == "start" else rng.randint(0, len(ids) - need)
            window = [int(t) for t in ids[offset:offset + need]]
            samples.append(Sample(f"{source}/{doc_id}/{offset}", source, doc_id, offset, window[:cfg.prefix],
                                  window[cfg.prefix:]))
        counts[source] = {"documents": len(docs), "too_short": len(docs) - len(usable), "sampled": len(chosen)}
    return samples, counts


# ---- distances ---------------------------------------------------------------------------------------------------


def edit_row(row: list[int], token: int, target: list[int]) -> list[int]:
    """The next row of the Levenshtein table: row[j] = distance(generated so far, target[:j]), one token more."""
    new = [row[0] + 1]
    for j, t in enumerate(target, 1):
        new.append(min(row[j] + 1, new[j - 1] + 1, row[j - 1] + (t != token)))
    return new


def edit_lower_bound(row: list[int]) -> int:
    """A lower bound on the final distance, whatever tokens follow: the generated prefix must be aligned with some
    prefix of the target, and the rest costs >= 0."""
    return min(row)


def classify(generated: list[int], target: list[int], max_distance: int) -> dict:
    """{"distance", "normalized", "exact", "approx"} of a full continuation (rapidfuzz's Levenshtein on tokens)."""
    from rapidfuzz.distance import Levenshtein

    d = Levenshtein.distance(generated, target)
    return {"distance": d, "normalized": d / max(len(target), len(generated), 1), "exact": generated == target,
            "approx": d <= max_distance}


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score interval of a binomial rate k / n (sound near 0 and 1, where the normal one is not)."""
    if n == 0:
        return [math.nan, math.nan]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


# ---- the audit ---------------------------------------------------------------------------------------------------


@torch.inference_mode()
def audit(model, tokenizer, samples: list[Sample], cfg: MemorizationConfig, on_done=None) -> list[dict]:
    """Greedy continuations of every sample, classified; `on_done(records)` is called with each finished batch of
    records (for writing them as they come). Returns the records in the order they finished."""
    from gemmalab.inference.engine import eval_mode
    from gemmalab.model.cache import RowCache

    S, B = cfg.suffix, min(cfg.batch_size, len(samples))
    capacity = 1 + cfg.prefix + S
    if capacity > model.config.max_seq_len:
        raise GemmalabError(f"prefix + suffix + 1 = {capacity} positions exceed the model's {model.config.max_seq_len}.")
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    done_all: list[dict] = []
    if not samples:
        return done_all
    queue = list(reversed(samples))
    cache = RowCache(model.config, B, capacity, dtype, device)
    rows: list[dict | None] = [None] * B  # per slot: sample, generated ids, edit row
    next_tokens = [0] * B

    def fill(slot: int) -> None:
        sample = queue.pop()
        alone = RowCache(model.config, 1, capacity, dtype, device)
        ids = torch.tensor([[tokenizer.bos_id, *sample.prompt]], device=device)
        logits = model(ids, cache=alone, num_logits=1)[0, -1]  # [V]: only the last position's
        cache.load_row(slot, alone)
        rows[slot] = {"sample": sample, "generated": [], "row": list(range(S + 1))}
        advance(slot, int(logits.argmax()))

    def advance(slot: int, token: int) -> None:
        r = rows[slot]
        r["generated"].append(token)
        r["row"] = edit_row(r["row"], token, r["sample"].target)
        next_tokens[slot] = token
        pruned = cfg.prune and edit_lower_bound(r["row"]) > cfg.max_distance
        if pruned or len(r["generated"]) == S:
            finished.append(_record(r["sample"], r["generated"], pruned, edit_lower_bound(r["row"]), cfg, tokenizer))
            rows[slot] = None
            cache.park(slot)

    with eval_mode(model):
        while queue or any(r is not None for r in rows):
            finished: list[dict] = []
            for slot in range(B):
                while rows[slot] is None and queue:  # a freed slot takes the next sample at once
                    fill(slot)
            if any(r is not None for r in rows):
                for slot in range(B):
                    if rows[slot] is None:
                        cache.park(slot)
                step = torch.tensor(next_tokens, device=device)[:, None]
                logits = model(step, cache=cache, num_logits=1)[:, -1]  # [B, V]: always B rows (same shapes)
                greedy = logits.argmax(-1).tolist()
                for slot in range(B):
                    if rows[slot] is not None:
                        advance(slot, greedy[slot])
            if finished:
                done_all += finished
                if on_done is not None:
                    on_done(finished)
    return done_all


def _record(sample: Sample, generated: list[int], pruned: bool, bound: int, cfg: MemorizationConfig,
            tokenizer) -> dict:
    rec = {"id": sample.id, "source": sample.source, "document": sample.document, "offset": sample.offset,
           "generated": generated, "pruned": pruned}
    if pruned:  # neither exact nor approximate; the distance is only known to exceed the threshold
        rec.update(exact=False, approx=False, distance_at_least=bound)
        return rec
    from rapidfuzz.distance import Levenshtein

    rec.update(classify(generated, sample.target, cfg.max_distance))
    text, true = tokenizer.decode(generated), tokenizer.decode(sample.target)
    rec["char_normalized"] = Levenshtein.normalized_distance(text, true)
    rec["char_approx"] = rec["char_normalized"] <= cfg.threshold
    return rec


# ---- the stage ---------------------------------------------------------------------------------------------------


def _fingerprint(cfg: MemorizationConfig, samples: list[Sample]) -> dict:
    digest = hashlib.sha256(json.dumps([[s.id, s.prompt, s.target] for s in samples]).encode()).hexdigest()[:16]
    return {"model": cfg.model, "model_files": stamp(cfg.model), "samples": digest, "threshold": cfg.threshold,
            "prune": cfg.prune, "dtype": str(cfg.dtype), "device": cfg.device}


def memorization(cfg: MemorizationConfig, out: str | Path, progress: bool = True, model=None, tokenizer=None) -> dict:
    """Run (or resume) the audit into run directory `out`; returns what result.json holds. `model` and `tokenizer`
    may be given (Python API); otherwise `cfg.model` is loaded."""
    started = time.perf_counter()
    if model is None:
        import gemmalab

        model, tokenizer = gemmalab.load(cfg.model, dtype=cfg.dtype, device=cfg.device)
    if tokenizer is None:
        raise GemmalabError(f"Model {cfg.model} has no tokenizer (tokenizer.model); add one to the model directory.")
    corpus = load_corpus(cfg.corpus, tokenizer)
    samples, counts = draw_samples(corpus, cfg)
    run = RunDir(out, "memorization")
    meta, meta_path = _fingerprint(cfg, samples), Path(out) / "memorization.meta.json"
    if meta_path.is_file() and (Path(out) / "samples.jsonl").is_file():
        old = json.loads(meta_path.read_text(encoding="utf-8"))
        changed = [k for k in meta if old.get(k) != meta[k]]
        if changed:
            raise GemmalabError(f"{out} holds an audit with other settings ({', '.join(changed)} differ). Use another "
                                "--out, or delete that folder to start again.")
    run.snapshot(cfg)
    write_json(meta_path, meta)
    with run.records("samples") as records:
        pending = [s for s in samples if s.id not in records.done]
        bar = tqdm(total=len(samples), initial=len(samples) - len(pending), desc="memorization", unit="sample",
                   disable=not progress, dynamic_ncols=True)

        def on_done(batch: list[dict]) -> None:
            records.append(batch)
            bar.update(len(batch))

        audit(model, tokenizer, pending, cfg, on_done)
        bar.close()
        done = [records.done[s.id] for s in samples]
    result = _figures(done, samples, counts, cfg, tokenizer, run.path)
    result["seconds"] = round(time.perf_counter() - started, 1)
    _plot(result, run.path / "memorization.png")
    return run.write_result("finished", result)


def _pii_of(text: str) -> list[dict]:
    from gemmalab.pii import find_pii

    return [{"kind": m.kind, "class": "sensitive" if m.kind in SENSITIVE else "personal", "start": m.start,
             "end": m.end, "text": m.text} for m in find_pii(text, unquoted_secrets=True)]


def _figures(records: list[dict], samples: list[Sample], counts: dict, cfg: MemorizationConfig, tokenizer,
             out: Path) -> dict:
    by_source: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_source[r["source"]].append(r)
    target_of = {s.id: s.target for s in samples}
    sources, memorized = {}, []
    bins = [i / 10 for i in range(11)]
    for source in sorted(counts):
        rs = by_source.get(source, [])
        n = len(rs)
        exact, approx = sum(r["exact"] for r in rs), sum(r["approx"] for r in rs)
        full = [r for r in rs if not r["pruned"]]
        distances = [r["normalized"] for r in full]
        pii = {"sensitive": Counter(), "personal": Counter()}
        for r in rs:
            if r["approx"]:
                text = tokenizer.decode(r["generated"])
                spans = _pii_of(text)
                for s in spans:
                    pii[s["class"]][s["kind"]] += 1
                memorized.append({"id": r["id"], "source": source, "exact": r["exact"], "distance": r["distance"],
                                  "text": text, "true_text": tokenizer.decode(target_of[r["id"]]), "pii": spans})
        mean = float(np.mean(distances)) if distances else math.nan
        half = 1.96 * float(np.std(distances, ddof=1)) / math.sqrt(len(distances)) if len(distances) > 1 else math.nan
        sources[source] = {
            **counts[source], "samples": n, "exact": exact, "approx": approx,
            "exact_rate": exact / n if n else math.nan, "exact_ci95": wilson(exact, n),
            "approx_rate": approx / n if n else math.nan, "approx_ci95": wilson(approx, n),
            "char_approx_rate": sum(r.get("char_approx", False) for r in rs) / n if n else math.nan,
            "pruned": n - len(full),
            # over the samples decoded to the end (all of them with prune = false)
            "mean_distance": mean, "mean_distance_ci95": [mean - half, mean + half],
            "distance_histogram": {"bins": bins, "counts": np.histogram(distances, bins=bins)[0].tolist(),
                                   "pruned_above_threshold": n - len(full)},
            "pii": {k: dict(v) for k, v in pii.items()},
        }
    from gemmalab.files import atomic_write

    atomic_write(out / "memorized.jsonl", "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in memorized))
    total = len(records)
    return {"model": cfg.model, "corpus": cfg.corpus, "prefix": cfg.prefix, "suffix": cfg.suffix,
            "threshold": cfg.threshold, "max_distance": cfg.max_distance, "offset": cfg.offset, "prune": cfg.prune,
            "samples": total, "exact_rate": sum(r["exact"] for r in records) / total if total else math.nan,
            "approx_rate": sum(r["approx"] for r in records) / total if total else math.nan,
            "sources": sources, "memorized": len(memorized),
            "pii": {k: dict(sum((Counter(s["pii"][k]) for s in sources.values()), Counter()))
                    for k in ("sensitive", "personal")},
            "plot": "memorization.png"}


def _plot(result: dict, path: Path) -> None:
    """Exact and approximate rates by source with their Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["sources"])
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 3.5))
    x = np.arange(len(names))
    for shift, kind in ((-0.18, "exact"), (0.18, "approx")):
        rates = [result["sources"][n][f"{kind}_rate"] for n in names]
        lo = [r - result["sources"][n][f"{kind}_ci95"][0] for r, n in zip(rates, names)]
        hi = [result["sources"][n][f"{kind}_ci95"][1] - r for r, n in zip(rates, names)]
        ax.bar(x + shift, rates, 0.36, yerr=[lo, hi], capsize=3, label=kind)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("memorized share")
    ax.set_title(f"Memorization: {result['prefix']}-token prompts, {result['suffix']}-token continuations")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
