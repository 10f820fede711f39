"""Config sections every training stage shares (`[model]`, `[train]`, `[checkpoint]`, `[debug]`; `[optim]` is
gemmalab.train.optim.OptimConfig, `[carbon]` gemmalab.train.metrics.CarbonConfig). A stage's config is a dataclass
of these plus its own `[data]` (gemmalab.train.pretrain.PretrainConfig); gemmalab.config loads and dumps it.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Any

import torch

from gemmalab.config import convert
from gemmalab.dtypes import dtype_name, parse_dtype
from gemmalab.errors import GemmalabError
from gemmalab.model.config import ModelConfig, get_preset

__all__ = ["ModelSpec", "TrainSection", "CheckpointSection", "DebugSection", "DEFAULT_PRESET", "resolve_run"]

DEFAULT_PRESET = "tiny-gemma3"


@dataclass
class ModelSpec:
    """`[model]`: the model a stage trains, resolved once to `config` (a ModelConfig).

    `preset` (a name in gemmalab.model.PRESETS) starts from random weights; `init_from` (a model REF: HF model
    directory, .gguf file or registered name) starts from that model's weights and tokenizer. Either may be
    given, not both; neither means the preset tiny-gemma3. Any other key is a ModelConfig field that differs
    (`vocab_size = 8192`); with `init_from` it must keep the weights' shapes (e.g. `max_seq_len`).
    """

    preset: str | None = None
    init_from: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    config: ModelConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.preset and self.init_from:
            raise GemmalabError(f"set `preset` ({self.preset!r}) or `init_from` ({self.init_from!r}), not both")
        if self.init_from:
            from gemmalab.checkpoint import load_config

            base = load_config(self.init_from)
        else:
            base = get_preset(self.preset or DEFAULT_PRESET)
        self.config = base.replace(**self.overrides)

    @classmethod
    def from_toml(cls, table: Any, where: str, key: str = "model") -> ModelSpec:
        if not isinstance(table, dict):
            raise GemmalabError(f"`{key}` must be a table, got {table!r}")
        table = dict(table)
        preset = convert(str | None, table.pop("preset", None), f"{key}.preset", where)
        init_from = convert(str | None, table.pop("init_from", None), f"{key}.init_from", where)
        hints = typing.get_type_hints(ModelConfig)
        overrides = {}
        for name, value in table.items():
            if name not in hints:
                raise GemmalabError(f"{where}: unknown key `{key}.{name}`; [{key}] takes `preset` or `init_from` and "
                                    f"the ModelConfig fields {', '.join(sorted(hints))}")
            overrides[name] = convert(hints[name], value, f"{key}.{name}", where)
        return cls(preset, init_from, overrides)

    def to_toml(self) -> dict:
        out = {"preset": self.preset} if self.preset else {}
        if self.init_from:
            out["init_from"] = self.init_from
        return {**out, **self.overrides}


@dataclass
class TrainSection:
    """`[train]`: the loop's length, numerics, memory/speed switches and failure handling."""

    steps: int = 300
    grad_accum: int = 1  # micro-batches per optimizer step
    # fp32, bf16 (bf16 compute, fp32 master weights), or "auto" (the default, resolved when the config is read): bf16
    # on CUDA (when there is one) and on CPUs with fast native bf16, else fp32
    dtype: torch.dtype = "auto"  # type: ignore[assignment]
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block
    z_loss: float = 0.0  # language-model objectives: weight of the log Z^2 term
    loss_chunk_mb: int = 256  # language-model objectives: fp32 logits built at a time (all rows if they fit)
    init_std: float = 0.02  # random initialisation (a preset; init_from loads weights instead)
    log_every: int = 1
    max_bad_steps: int = 5  # non-finite steps in a row before the run stops
    seed: int = 0  # weight init
    device: str = "auto"  # "auto": CUDA when available, else CPU (ignored under torchrun)
    threads: int = 0  # CPU threads (torch.set_num_threads); 0: torch's default
    keep_freed_memory: bool = True  # CPU: glibc malloc keeps freed memory (no per-step page faults; gemmalab.host_memory)
    peak_flops: float | None = None  # per device, for MFU; None: the GPU's spec sheet, or measured on CPU

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):  # "auto", the default
            self.dtype = parse_dtype(self.dtype, None if self.device == "auto" else self.device)
        problems = [f"`{name}` must be >= 1, got {getattr(self, name)}"
                    for name in ("steps", "grad_accum", "loss_chunk_mb", "log_every", "max_bad_steps")
                    if getattr(self, name) < 1]
        if self.dtype not in (torch.float32, torch.bfloat16):
            problems.append(f"`dtype` must be fp32 or bf16, got {dtype_name(self.dtype)}")
        if self.z_loss < 0 or not math.isfinite(self.z_loss):
            problems.append(f"`z_loss` must be >= 0, got {self.z_loss}")
        if self.threads < 0:
            problems.append(f"`threads` must be >= 0, got {self.threads}")
        if self.peak_flops is not None and not self.peak_flops > 0:
            problems.append(f"`peak_flops` must be positive or unset, got {self.peak_flops}")
        if problems:
            raise GemmalabError("; ".join(problems))


@dataclass
class CheckpointSection:
    """`[checkpoint]`: train-state checkpoints (DCP) under OUT/checkpoints/, and the exported model."""

    every: int = 100  # steps; 0: only at the end and on SIGTERM
    keep: int = 2  # newest complete checkpoints kept
    at_end: bool = True  # also when the run finishes (SIGTERM always writes one); off for benchmarks
    export: bool = True  # the trained model as a model directory, OUT/model

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep < 1:
            raise GemmalabError(f"`every` must be >= 0 and `keep` >= 1, got {self.every} and {self.keep}")


@dataclass
class DebugSection:
    """`[debug]`: faults injected by tests (gemmalab.train.debug); never set in real runs."""

    nan_steps: list[int] = field(default_factory=list)  # these (1-based) steps' activations become NaN
    hang_at_step: int = 0  # after this step, write OUT/hang-STEP and wait for a signal
    hang_in_checkpoint: str = ""  # a phase (checkpoint.PHASES): hang inside the write of hang_at_step's checkpoint

    def __post_init__(self) -> None:
        from gemmalab.train.checkpoint import PHASES

        if self.hang_in_checkpoint not in ("", *PHASES):
            raise GemmalabError(f"`hang_in_checkpoint` must be one of {', '.join(PHASES)} (or empty), got "
                                f"{self.hang_in_checkpoint!r}")


def resolve_run(cfg) -> None:
    """What every training stage config settles once its sections are built (call it from `__post_init__`): the LR
    schedule spans the run unless `optim.total_steps` says otherwise, and rows fit the model."""
    cfg.optim = cfg.optim.for_run(cfg.train.steps)
    if cfg.data.seq_len > cfg.model.config.max_seq_len:
        raise GemmalabError(f"`data.seq_len` ({cfg.data.seq_len}) exceeds the model's max_seq_len "
                            f"({cfg.model.config.max_seq_len})")
