"""`prepare`: input documents -> filtered, decontaminated, deduplicated documents + a data card.

The work is a chain of datatrove executors (stages), each a list of datatrove pipeline steps:

    filter          read (counting) -> decontaminate -> language -> quality -> safety -> PII -> write
                    -> exact-dedup signatures
    exact_find      datatrove ExactFindDedups (1 task)
    exact_filter    datatrove ExactDedupFilter -> write -> MinHash signatures
    minhash_buckets datatrove MinhashDedupBuckets (one task per bucket)
    minhash_cluster datatrove MinhashDedupCluster (1 task)
    minhash_filter  datatrove MinhashDedupFilter -> count -> write `documents/NNNNN.jsonl`

Stages whose dedup is switched off are left out. The same stages run on datatrove's local, Ray or
Slurm executor (`executor.kind`); local and Ray produce identical files for the same `tasks`.

Output folder (a run directory, gemmalab.runs): `config.toml` (resolved), `documents/` (design-contract JSONL,
one file per task), `data_card.json`, `decontamination.json`, `tokens/` (token shards, when packing; with
`[canaries] enabled`, generated canary documents are planted there after dedup, gemmalab.data.canaries),
`tokenizer/` (when one is trained), `logs/<stage>/` (datatrove logs and stats), `work/` (intermediate files) and
`result.json` (written last: stage "data", the document counts, the tokens packed).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
from datatrove.pipeline.dedup.minhash import (
    MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature,
)
from datatrove.pipeline.writers.jsonl import JsonlWriter

from gemmalab.config import load, to_table
from gemmalab.data.card import DataCard, build_data_card, collect_counts
from gemmalab.data.config import DataConfig
from gemmalab.data.decontam import NgramIndex, contamination_report
from gemmalab.data.dedup import (
    CountingDedup, WhitespaceWordTokenizer, exact_config, lsh_match_probability, lsh_threshold, minhash_config,
)
from gemmalab.data.filters import DecontamFilter, LanguageFilter, PiiFilter, QualityFilter, SafetyFilter
from gemmalab.checkpoint import load_tokenizer
from gemmalab.data.reader import CountingJsonlReader, InputFile, OutputCounter, TaskFileReader, document_adapter
from gemmalab.errors import GemmalabError
from gemmalab.files import jsonl_lines, write_json
from gemmalab.runs import RunDir

__all__ = ["Stage", "prepare", "prepare_from_file", "finish", "resolve_inputs", "build_stages", "build_executors",
           "DataCard"]

_OUTPUT_DIRS = ("documents", "logs", "work")


@dataclass
class Stage:
    """One datatrove executor's worth of work."""

    name: str
    pipeline: list[PipelineStep]
    tasks: int


def resolve_inputs(cfg: DataConfig, out_dir: Path) -> list[InputFile]:
    """The input files, sorted, with their default source (writes the built-in corpus if asked)."""
    files: list[InputFile] = []
    for i, spec in enumerate(cfg.inputs):
        if spec.builtin:
            from gemmalab.data.corpus import write_builtin_corpus

            paths = write_builtin_corpus(out_dir / "input", max_files=spec.builtin_max_files,
                                         math_problems=spec.builtin_math_problems)
            files += [InputFile(str(p), p.name.split(".")[0]) for p in paths]
            continue
        p = Path(spec.path)
        if p.is_file():
            files.append(InputFile(str(p), spec.source))
        elif p.is_dir():
            found = sorted(q for q in p.rglob(spec.glob) if q.is_file())
            if not found:
                raise GemmalabError(f"inputs[{i}]: no files matching {spec.glob!r} under {p}")
            files += [InputFile(str(q), spec.source) for q in found]
        else:
            raise GemmalabError(f"inputs[{i}]: path not found: {p}")
    return files


def _writer(folder: Path) -> JsonlWriter:
    return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None, adapter=document_adapter)


def build_stages(cfg: DataConfig, out_dir: str | Path, files: list[InputFile], tokenizer: str | None = None,
                 index: NgramIndex | None = None) -> list[Stage]:
    """The datatrove stages for `cfg` (see the module docstring), writing under `out_dir`.

    `tokenizer` (a REF; default `cfg.tokenizer`) counts tokens in and out; `index`, the benchmarks' n-gram index
    built once (default: each worker builds its own).
    """
    out = Path(out_dir)
    work = out / "work"
    kinds = cfg.kinds()
    tasks = cfg.executor.tasks
    tokenizer = tokenizer or cfg.tokenizer
    steps: list[PipelineStep] = [CountingJsonlReader(files, cfg.text_key, cfg.id_key, tokenizer)]
    dc = cfg.decontamination
    if dc.enabled and dc.benchmarks:
        steps.append(DecontamFilter(dc, str(work / "decontam_hits"), kinds, index))
    if cfg.language.enabled:
        steps.append(LanguageFilter(cfg.language, kinds))
    if cfg.quality.enabled:
        steps.append(QualityFilter(cfg.quality, kinds))
    if cfg.safety.enabled:
        steps.append(SafetyFilter(cfg.safety, kinds))
    if cfg.pii.enabled:
        steps.append(PiiFilter(cfg.pii, kinds))

    final = [OutputCounter(tokenizer), _writer(out / "documents")]
    stages: list[Stage] = []
    mh = minhash_config(cfg.dedup)
    tokenizer = WhitespaceWordTokenizer()

    def minhash_head(folder: Path) -> list[PipelineStep]:
        return [_writer(folder), MinhashDedupSignature(str(work / "minhash_sigs"), config=mh, language=tokenizer)]

    if cfg.dedup.exact:
        steps += [_writer(work / "filtered"), ExactDedupSignature(str(work / "exact_sigs"), config=exact_config())]
        stages.append(Stage("filter", steps, tasks))
        stages.append(Stage("exact_find", [ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"),
                                                           config=exact_config())], 1))
        exact = [TaskFileReader(str(work / "filtered")),
                 CountingDedup(ExactDedupFilter(str(work / "exact_dups"), config=exact_config()), "exact_duplicate")]
        if cfg.dedup.minhash:
            stages.append(Stage("exact_filter", exact + minhash_head(work / "exact_deduped"), tasks))
        else:
            stages.append(Stage("exact_filter", exact + final, tasks))
    elif cfg.dedup.minhash:
        stages.append(Stage("filter", steps + minhash_head(work / "exact_deduped"), tasks))
    else:
        stages.append(Stage("filter", steps + final, tasks))
    if cfg.dedup.minhash:
        stages.append(Stage("minhash_buckets", [MinhashDedupBuckets(str(work / "minhash_sigs"),
                                                                    str(work / "minhash_buckets"), config=mh)],
                            cfg.dedup.num_buckets))
        stages.append(Stage("minhash_cluster", [MinhashDedupCluster(str(work / "minhash_buckets"),
                                                                    str(work / "minhash_remove"), config=mh)], 1))
        stages.append(Stage("minhash_filter", [
            TaskFileReader(str(work / "exact_deduped")),
            CountingDedup(MinhashDedupFilter(str(work / "minhash_remove")), "near_duplicate"),
        ] + final, tasks))
    return stages


def build_executors(cfg: DataConfig, stages: list[Stage], out_dir: str | Path) -> list:
    """One datatrove executor per stage, of `cfg.executor.kind`; Slurm ones chained by `depends`."""
    ex = cfg.executor
    logs = Path(out_dir) / "logs"
    executors = []
    for st in stages:
        common = dict(pipeline=st.pipeline, tasks=st.tasks, logging_dir=str(logs / st.name))
        if ex.kind == "local":
            from datatrove.executor.local import LocalPipelineExecutor

            executors.append(LocalPipelineExecutor(workers=min(ex.workers, st.tasks), **common))
        elif ex.kind == "ray":
            from datatrove.executor.ray import RayPipelineExecutor

            executors.append(RayPipelineExecutor(workers=min(ex.workers, st.tasks), cpus_per_task=ex.ray_cpus_per_task,
                                                 mem_per_cpu_gb=ex.ray_mem_per_cpu_gb, **common))
        else:  # slurm (the config allows nothing else)
            from datatrove.executor.slurm import SlurmPipelineExecutor

            executors.append(SlurmPipelineExecutor(
                time=ex.slurm_time, partition=ex.slurm_partition, cpus_per_task=ex.slurm_cpus_per_task,
                mem_per_cpu_gb=ex.slurm_mem_per_cpu_gb, qos=ex.slurm_qos, sbatch_args=dict(ex.slurm_sbatch_args),
                job_name=f"gemmalab_data_{st.name}", depends=executors[-1] if executors else None, **common))
    return executors


# What tells a finished preparation: removed before any new document is written, written again only by `finish`,
# so a folder that holds new (partial) documents never shows the old run's card or counts.
_SUMMARY_FILES = ("result.json", "data_card.json", "decontamination.json", "tokens/meta.json")
_SNAPSHOT_HEADER = "# Resolved data config (gemmalab)"  # the first line RunDir(out, "data").snapshot writes


def check_output_folder(out: Path) -> None:
    """Refuse to clear `out` unless it is empty, new, or an earlier preparation's: `prepare` deletes its
    documents/, logs/ and work/, which in a folder of someone else's would be their files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise GemmalabError(f"output folder {out} is a file.")
    if not any(out.iterdir()):
        return
    config = out / "config.toml"
    with contextlib.suppress(OSError):
        if config.is_file() and config.read_text(encoding="utf-8", errors="replace").startswith(_SNAPSHOT_HEADER):
            return
    raise GemmalabError(f"output folder {out} is not empty and is not an earlier `gemmalab data prepare` output (its "
                        f"config.toml would start with {_SNAPSHOT_HEADER!r}); preparing would delete its documents/, "
                        f"logs/ and work/. Name a new or empty folder with --out.")


def _prepare_dirs(out: Path) -> None:
    for name in _SUMMARY_FILES:
        (out / name).unlink(missing_ok=True)
    for name in _OUTPUT_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    # datatrove's dedup readers list these folders even when an earlier stage found nothing to write.
    for sub in ("work/decontam_hits", "work/exact_dups", "work/minhash_remove", "documents"):
        (out / sub).mkdir(parents=True, exist_ok=True)


def finish(cfg: DataConfig, out_dir: str | Path, index: NgramIndex | None = None) -> DataCard:
    """Complete a run whose datatrove stages have ended (`prepare` calls it; after Slurm, call it yourself): write
    `decontamination.json` and `data_card.json` from the stages' stats and hit files, pack the kept documents
    into token shards (with `cfg.tokenizer`, else the one trained into OUT/tokenizer/), and write `result.json`.
    `index`: the benchmarks' n-gram index if already built."""
    out = Path(out_dir)
    hits = [obj for f in sorted((out / "work" / "decontam_hits").glob("*.jsonl"))
            for _, obj, _ in jsonl_lines(f) if obj is not None]
    dc = cfg.decontamination
    if index is None:
        index = NgramIndex(dc.benchmarks if dc.enabled else [], dc.ngram)
    report = contamination_report(index, hits)
    report["mode"] = dc.mode
    write_json(out / "decontamination.json", report)
    summary = {name: {k: v for k, v in b.items() if k != "contaminated_items"}
               for name, b in report["benchmarks"].items()}
    conf = to_table(cfg)
    d = cfg.dedup
    conf["dedup"]["lsh_threshold_estimate"] = round(lsh_threshold(d.num_buckets, d.hashes_per_bucket), 4)
    conf["dedup"]["p_match_at_jaccard_0.8"] = round(lsh_match_probability(0.8, d.num_buckets, d.hashes_per_bucket), 4)
    card = build_data_card(collect_counts(out / "logs"), summary, cfg.executor.kind, conf)
    card.write(out / "data_card.json")
    figures = {"documents_in": card.documents_in, "documents_out": card.documents_out,
               "documents_dropped": card.documents_dropped, "reconciled": card.reconciled,
               "malformed_lines": sum(card.malformed_lines.values()), "data_card": str(out / "data_card.json")}
    if cfg.pack.enabled:
        from gemmalab.data.packing import pack

        tokenizer = cfg.tokenizer or str(out / "tokenizer" / "tokenizer.model")
        meta = pack(sorted((out / "documents").glob("*.jsonl*")), load_tokenizer(tokenizer), out / "tokens",
                    seq_len=cfg.pack.seq_len, shard_tokens=cfg.pack.shard_tokens, canaries=cfg.canaries)
        figures |= {"tokens": meta.num_tokens, "vocab_size": meta.vocab_size, "token_shards": str(out / "tokens"),
                    "tokenizer": tokenizer}
        if meta.canaries is not None:  # planted after dedup, so every copy stays
            figures["canaries"] = {k: meta.canaries[k] for k in ("source", "documents", "copies", "packed_tokens", "file")}
    RunDir(out, "data").write_result("finished", figures)
    return card


def prepare(config: DataConfig, out_dir: str | Path | None = None, *, log_file: str | Path | None = None
            ) -> DataCard | None:
    """Run the whole data preparation; returns the data card (None for Slurm, which only submits).

    `out_dir` defaults to `config.out_dir`: a new or empty folder, or an earlier preparation's (anything else is
    refused), whose `documents/`, `logs/`, `work/`, data card and counts are replaced. With `executor.kind = "ray"`, an already initialised Ray is used, else `ray.init`
    (with `executor.ray_address` when set). `log_file`: where datatrove's logs go (they are written to file
    descriptor 2 by every worker); None leaves them on stderr.
    """
    out = Path(out_dir or config.out_dir)
    check_output_folder(out)
    run = RunDir(out, "data").create()
    run.snapshot(config)  # first: it marks the folder as ours, should the run stop before it ends
    _prepare_dirs(out)  # the old card and counts go before any new document is written
    with _stderr_to(log_file):
        files = resolve_inputs(config, out)
        tokenizer = config.tokenizer
        if config.pack.enabled and tokenizer is None:
            tokenizer = str(train_tokenizer_on_inputs(config, files, out))
        dc = config.decontamination
        index = NgramIndex(dc.benchmarks if dc.enabled else [], dc.ngram)  # once; bad benchmark files fail here
        stages = build_stages(config, out, files, tokenizer, index)
        if config.executor.kind == "ray":
            import ray

            if not ray.is_initialized():
                ray.init(address=config.executor.ray_address)
        executors = build_executors(config, stages, out)
        if config.executor.kind == "local":
            _preload_workers()
        if config.executor.kind == "slurm":
            executors[-1].run()  # submits the whole chain through `depends`
            run.write_result("submitted", {"note": "when the Slurm jobs end, gemmalab.data.pipeline.finish(config, "
                                                   "out_dir) writes the data card, the token shards and result.json"})
            return None
        for ex in executors:
            ex.run()
        return finish(config, out, index)


def _preload_workers() -> None:
    """datatrove's local workers are forked from a forkserver: have it import the pipeline's modules once (torch,
    the filters, the tokenizer), so that each task's process starts without importing them again (about 10 s of
    the built-in preparation on 2 cores). Takes effect when this process starts its forkserver, i.e. once."""
    import multiprocess

    multiprocess.get_context("forkserver").set_forkserver_preload(["__main__", "gemmalab.data.pipeline"])  # "__main__": the default


@contextlib.contextmanager
def _stderr_to(path: str | Path | None):
    """Send file descriptor 2 (datatrove's workers log every step at INFO there) to `path`, if given."""
    if path is None:
        yield
        return
    saved = os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def train_tokenizer_on_inputs(config: DataConfig, files: list[InputFile], out: Path) -> Path:
    """Train a tokenizer with Gemma's settings on the input texts (OUT/tokenizer/), before filtering, so the
    data card can count tokens in and out with the tokenizer the shards use. Malformed lines are skipped
    here; the pipeline's reader counts them."""
    from gemmalab.tokenizer import train_tokenizer

    folder = out / "tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    sample = folder / "training_text.txt"
    with open(sample, "w", encoding="utf-8") as f:
        for input_file in files:
            for _, row, _ in jsonl_lines(input_file.path):
                text = row.get(config.text_key) if row is not None else None
                if isinstance(text, str) and text.strip():
                    f.write(text.replace("\r", "") + "\n")
    train_tokenizer([sample], config.pack.vocab_size, folder, input_sentence_size=config.pack.train_sentences)
    sample.unlink()
    return folder / "tokenizer.model"


def prepare_from_file(config_path: str | Path, out_dir: str | Path | None = None,
                      overrides: list[str] | None = None, log_file: str | Path | None = None) -> DataCard | None:
    """`gemmalab data prepare --config FILE.toml [--out DIR] [key=value ...]`."""
    return prepare(load(DataConfig, config_path, overrides), out_dir, log_file=log_file)
