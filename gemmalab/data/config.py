"""`DataConfig`: what `gemmalab data prepare` does, as dataclasses loaded from TOML by gemmalab.config:

    cfg = gemmalab.config.load(DataConfig, "configs/data/builtin.toml", ["executor.tasks=4"])

Unknown keys and wrong types are errors that name the file and the dotted key; values no stage could run with
are refused when the config is built. Relative paths are taken from the current directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gemmalab.data.canaries import CanaryConfig
from gemmalab.data.decontam import BenchmarkSpec, DecontamConfig
from gemmalab.data.dedup import DedupConfig
from gemmalab.data.filters import (
    KINDS, LanguageConfig, PiiConfig, QualityConfig, QualityThresholds, SafetyConfig, SourceKinds,
)
from gemmalab.errors import GemmalabError

__all__ = ["InputSpec", "ExecutorConfig", "PackConfig", "DataConfig", "CanaryConfig", "BenchmarkSpec", "DecontamConfig", "DedupConfig", "LanguageConfig", "PiiConfig", "QualityConfig",
           "QualityThresholds", "SafetyConfig"]


@dataclass
class InputSpec:
    """Input documents: a file or a folder (files matching `glob`, recursively), or the built-in corpus.

    `source` names the source of documents whose metadata has none.
    """

    path: str = ""
    source: str | None = None
    glob: str = "*.jsonl*"
    builtin: bool = False  # gemmalab.data.corpus.write_builtin_corpus(out_dir / "input")
    builtin_max_files: int | None = None
    builtin_math_problems: int = 20000

    def __post_init__(self) -> None:
        if not self.builtin and not self.path:
            raise GemmalabError("an input needs `path` or `builtin = true`")


EXECUTORS = ("local", "ray", "slurm")


@dataclass
class ExecutorConfig:
    """Where the datatrove stages run: `local` (processes), `ray` (a running Ray cluster; `ray.init()`
    first, or `ray_address` to connect), or `slurm` (sbatch jobs chained by dependency)."""

    kind: str = "local"
    tasks: int = 2
    workers: int = 1
    ray_address: str | None = None
    ray_cpus_per_task: int = 1
    ray_mem_per_cpu_gb: float = 1.0
    slurm_partition: str = ""
    slurm_time: str = "24:00:00"
    slurm_cpus_per_task: int = 1
    slurm_mem_per_cpu_gb: float = 2.0
    slurm_qos: str = "normal"
    slurm_sbatch_args: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise GemmalabError(f"`kind` = {self.kind!r}; choose one of {', '.join(EXECUTORS)}")
        if self.tasks < 1 or self.workers < 1:
            raise GemmalabError("`tasks` and `workers` must be >= 1")


@dataclass
class PackConfig:
    """Token shards of the kept documents (OUT/tokens/, design.md's contract) for training.

    The tokenizer is the config's `tokenizer`; without one, a tokenizer with Gemma's settings and
    `vocab_size` pieces is trained on the input documents (OUT/tokenizer/) before filtering.
    """

    enabled: bool = True
    seq_len: int = 8192  # recorded in meta.json as the loader's default
    vocab_size: int = 8192
    train_sentences: int = 300_000  # texts sampled (seeded) to train the tokenizer on
    shard_tokens: int = 2**27

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.vocab_size < 300:
            raise GemmalabError("`seq_len` must be >= 1 and `vocab_size` >= 300")


@dataclass
class DataConfig:
    """Everything `prepare` needs; the TOML tables have the same names as the fields."""

    inputs: list[InputSpec] = field(default_factory=list)
    out_dir: str = "runs/data/builtin"
    text_key: str = "text"
    id_key: str = "id"
    # Count tokens in and out per source and pack with this tokenizer: a model reference ("gemma3-270m",
    # a model folder, a .gguf) or a tokenizer.model file. None: one is trained (see [pack]).
    tokenizer: str | None = None
    # source name -> kind (prose, code, math); unlisted sources are prose.
    source_kinds: dict[str, str] = field(default_factory=lambda: {"code": "code", "math": "math"})
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    pii: PiiConfig = field(default_factory=PiiConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    decontamination: DecontamConfig = field(default_factory=DecontamConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    canaries: CanaryConfig = field(default_factory=CanaryConfig)  # planted into the packed tokens; off by default

    def kinds(self) -> SourceKinds:
        return SourceKinds(kinds=dict(self.source_kinds))

    def __post_init__(self) -> None:
        for src, kind in self.source_kinds.items():
            if kind not in KINDS:
                raise GemmalabError(f"`source_kinds`.{src} = {kind!r}; choose one of {KINDS}")
        if not self.inputs:
            raise GemmalabError("no [[inputs]]; give a path or `builtin = true`")
        if self.tokenizer is not None:
            from gemmalab.checkpoint import check_ref

            check_ref(self.tokenizer, "tokenizer")
