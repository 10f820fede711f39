"""`DataConfig`: what `gemmalab data prepare` does, as dataclasses loaded from TOML.

Unknown keys and wrong types are errors that name the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from gemmalab.config import apply_overrides, from_table, read_toml
from gemmalab.data.decontam import BenchmarkSpec, DecontamConfig
from gemmalab.data.dedup import DedupConfig
from gemmalab.data.filters import (
    KINDS, LanguageConfig, PiiConfig, QualityConfig, QualityThresholds, SafetyConfig, SourceKinds,
)
from gemmalab.errors import GemmalabError

__all__ = ["InputSpec", "ExecutorConfig", "PackConfig", "DataConfig", "load_data_config", "config_from_dict", "config_to_dict",
           "BenchmarkSpec", "DecontamConfig", "DedupConfig", "LanguageConfig", "PiiConfig", "QualityConfig",
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

    def kinds(self) -> SourceKinds:
        return SourceKinds(kinds=dict(self.source_kinds))

    def validate(self, where: str = "config") -> None:
        """Raise GemmalabError on values no stage could run with."""
        for src, kind in self.source_kinds.items():
            if kind not in KINDS:
                raise GemmalabError(f"{where}: source_kinds.{src} = {kind!r}; choose one of {KINDS}")
        if self.pii.mode not in ("redact", "drop"):
            raise GemmalabError(f"{where}: pii.mode = {self.pii.mode!r}; choose 'redact' or 'drop'")
        if self.decontamination.mode not in ("drop", "split"):
            raise GemmalabError(f"{where}: decontamination.mode = {self.decontamination.mode!r}; choose 'drop' or 'split'")
        if self.executor.kind not in ("local", "ray", "slurm"):
            raise GemmalabError(f"{where}: executor.kind = {self.executor.kind!r}; choose local, ray or slurm")
        if self.executor.tasks < 1 or self.executor.workers < 1:
            raise GemmalabError(f"{where}: executor.tasks and executor.workers must be >= 1")
        if not self.inputs:
            raise GemmalabError(f"{where}: no [[inputs]]; give a path or `builtin = true`")
        from gemmalab.checkpoint import REGISTERED

        if self.tokenizer is not None and self.tokenizer not in REGISTERED and not Path(self.tokenizer).exists():
            raise GemmalabError(f"{where}: tokenizer = {self.tokenizer!r}: no such file or folder, nor a registered "
                                f"model name ({', '.join(REGISTERED)})")
        if self.pack.seq_len < 1 or self.pack.vocab_size < 300:
            raise GemmalabError(f"{where}: pack.seq_len must be >= 1 and pack.vocab_size >= 300")
        for i, spec in enumerate(self.inputs):
            if not spec.builtin and not spec.path:
                raise GemmalabError(f"{where}: inputs[{i}] needs `path` or `builtin = true`")


def config_from_dict(data: dict, where: str = "config") -> DataConfig:
    """A validated DataConfig from a plain dict (TOML's shape)."""
    cfg = from_table(DataConfig, data, where, false_is_none=True)
    cfg.validate(where)
    return cfg


def load_data_config(path: str | Path, overrides: dict | None = None) -> DataConfig:
    """Load and validate a data-preparation TOML file; relative input and benchmark paths are
    resolved against the current directory (as the CLI user typed them)."""
    data = read_toml(path, "data config")
    apply_overrides(data, overrides or {})
    return config_from_dict(data, str(Path(path)))


def config_to_dict(cfg: DataConfig) -> dict:
    """The resolved config as plain data (for the data card); dict keys become strings."""

    def clean(x):
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return clean(dataclasses.asdict(cfg))
