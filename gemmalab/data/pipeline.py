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

Output folder: `documents/` (design-contract JSONL, one file per task), `data_card.json`,
`decontamination.json`, `config.json` (resolved), `logs/<stage>/` (datatrove logs and stats) and
`work/` (intermediate files).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter, ExactDedupSignature, ExactFindDedups
from datatrove.pipeline.dedup.minhash import (
    MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature,
)
from datatrove.pipeline.writers.jsonl import JsonlWriter

from gemmalab.data.card import DataCard, build_data_card, collect_counts
from gemmalab.data.config import DataConfig, config_to_dict, load_data_config
from gemmalab.data.decontam import NgramIndex, contamination_report
from gemmalab.data.dedup import (
    CountingDedup, WhitespaceWordTokenizer, exact_config, lsh_match_probability, lsh_threshold, minhash_config,
)
from gemmalab.data.filters import DecontamFilter, LanguageFilter, PiiFilter, QualityFilter, SafetyFilter
from gemmalab.checkpoint import load_tokenizer
from gemmalab.data.reader import (
    CountingJsonlReader, InputFile, OutputCounter, TaskFileReader, document_adapter, open_lines,
)
from gemmalab.errors import GemmalabError

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


def build_stages(cfg: DataConfig, out_dir: str | Path, files: list[InputFile]) -> list[Stage]:
    """The datatrove stages for `cfg` (see the module docstring), writing under `out_dir`."""
    out = Path(out_dir)
    work = out / "work"
    kinds = cfg.kinds()
    tasks = cfg.executor.tasks
    steps: list[PipelineStep] = [CountingJsonlReader(files, cfg.text_key, cfg.id_key, cfg.tokenizer)]
    dc = cfg.decontamination
    if dc.enabled and dc.benchmarks:
        steps.append(DecontamFilter(dc, str(work / "decontam_hits"), kinds))
    if cfg.language.enabled:
        steps.append(LanguageFilter(cfg.language, kinds))
    if cfg.quality.enabled:
        steps.append(QualityFilter(cfg.quality, kinds))
    if cfg.safety.enabled:
        steps.append(SafetyFilter(cfg.safety, kinds))
    if cfg.pii.enabled:
        steps.append(PiiFilter(cfg.pii, kinds))

    final = [OutputCounter(cfg.tokenizer), _writer(out / "documents")]
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
        elif ex.kind == "slurm":
            from datatrove.executor.slurm import SlurmPipelineExecutor

            executors.append(SlurmPipelineExecutor(
                time=ex.slurm_time, partition=ex.slurm_partition, cpus_per_task=ex.slurm_cpus_per_task,
                mem_per_cpu_gb=ex.slurm_mem_per_cpu_gb, qos=ex.slurm_qos, sbatch_args=dict(ex.slurm_sbatch_args),
                job_name=f"gemmalab_data_{st.name}", depends=executors[-1] if executors else None, **common))
        else:
            raise GemmalabError(f"executor.kind = {ex.kind!r}; choose local, ray or slurm")
    return executors


def _prepare_dirs(out: Path) -> None:
    for name in _OUTPUT_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    # datatrove's dedup readers list these folders even when an earlier stage found nothing to write.
    for sub in ("work/decontam_hits", "work/exact_dups", "work/minhash_remove", "documents"):
        (out / sub).mkdir(parents=True, exist_ok=True)


def finish(cfg: DataConfig, out_dir: str | Path) -> DataCard:
    """Write `decontamination.json` and `data_card.json` from the stages' stats and hit files."""
    out = Path(out_dir)
    hits = []
    for f in sorted((out / "work" / "decontam_hits").glob("*.jsonl")):
        hits += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    dc = cfg.decontamination
    report = contamination_report(NgramIndex(dc.benchmarks if dc.enabled else [], dc.ngram), hits)
    report["mode"] = dc.mode
    (out / "decontamination.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    summary = {name: {k: v for k, v in b.items() if k != "contaminated_items"}
               for name, b in report["benchmarks"].items()}
    conf = config_to_dict(cfg)
    d = cfg.dedup
    conf["dedup"]["lsh_threshold_estimate"] = round(lsh_threshold(d.num_buckets, d.hashes_per_bucket), 4)
    conf["dedup"]["p_match_at_jaccard_0.8"] = round(lsh_match_probability(0.8, d.num_buckets, d.hashes_per_bucket), 4)
    card = build_data_card(collect_counts(out / "logs"), summary, cfg.executor.kind, conf)
    card.write(out / "data_card.json")
    return card


def prepare(config: DataConfig, out_dir: str | Path | None = None) -> DataCard | None:
    """Run the whole data preparation; returns the data card (None for Slurm, which only submits).

    `out_dir` defaults to `config.out_dir`. Earlier `documents/`, `logs/` and `work/` there are
    replaced. With `executor.kind = "ray"`, an already initialised Ray is used, else `ray.init`
    (with `executor.ray_address` when set).
    """
    config.validate()
    out = Path(out_dir or config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _prepare_dirs(out)
    files = resolve_inputs(config, out)
    if config.pack.enabled and config.tokenizer is None:
        config = dataclasses.replace(config, tokenizer=str(train_tokenizer_on_inputs(config, files, out)))
    (out / "config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n", encoding="utf-8")
    if config.decontamination.enabled:
        NgramIndex(config.decontamination.benchmarks, config.decontamination.ngram)  # fail early on bad files
    stages = build_stages(config, out, files)
    if config.executor.kind == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=config.executor.ray_address)
    executors = build_executors(config, stages, out)
    if config.executor.kind == "slurm":
        executors[-1].run()  # submits the whole chain through `depends`
        return None
    for ex in executors:
        ex.run()
    card = finish(config, out)
    if config.pack.enabled:
        from gemmalab.data.packing import pack

        pack(sorted((out / "documents").glob("*.jsonl*")), load_tokenizer(config.tokenizer), out / "tokens",
             seq_len=config.pack.seq_len, shard_tokens=config.pack.shard_tokens)
    return card


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
            with open_lines(input_file.path) as lines:
                for raw in lines:
                    try:
                        text = json.loads(raw)[config.text_key]
                    except (ValueError, KeyError, TypeError):
                        continue
                    if isinstance(text, str) and text.strip():
                        f.write(text.replace("\r", "") + "\n")
    train_tokenizer([sample], config.pack.vocab_size, folder, input_sentence_size=config.pack.train_sentences)
    sample.unlink()
    return folder / "tokenizer.model"


def prepare_from_file(config_path: str | Path, out_dir: str | Path | None = None) -> DataCard | None:
    """`gemmalab data prepare --config FILE.toml [--out DIR]`."""
    return prepare(load_data_config(config_path), out_dir)
