"""The training loop every training stage shares; a stage brings an objective and its batches.

    trainer = Trainer(cfg, out_dir, stage="pretrain", resume=False)   # devices, threads, the run directory
    model, tokenizer = trainer.build_model()                          # [model]: a preset, or init_from a model REF
    result = trainer.fit(model, objective, batches, tokenizer=tokenizer, seq_len=T)

`objective` has `units(batch)` (what its loss sums over: target tokens, preference pairs; a 0-dim tensor),
`tokens(batch)` (input tokens the model reads, for throughput) and `loss(model, batch) -> LossOutput` (the loss
summed over the batch's units, and sums of the figures to log). `batches` is an iterator with
`state_dict()` / `load_state_dict()` (gemmalab.data.loader.TokenLoader is one), so a resumed run continues it.

One step = `train.grad_accum` micro-batches per process. The loss of each is scaled by world size / the step's
units over all ranks before backward, so accumulation and data parallelism give the mean over every unit of the
step (FSDP averages gradients over ranks, hence the world size). Then clipping, a non-finite check (the update is
skipped and logged; `train.max_bad_steps` such steps in a row stop the run), AdamW and the LR schedule.

The loop owns devices and FSDP2 (gemmalab.train.parallel), bf16 (autocast in one process, FSDP2's mixed
precision under torchrun), the optimizer and schedule, metrics (metrics.jsonl, TensorBoard, MFU, memory, carbon),
DCP checkpoints with exact resume (model, optimizer, schedule, batches, RNG), SIGTERM (checkpoint, then stop), the
progress bar and the exported model directory. The stage writes result.json (gemmalab.runs) with its figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gemmalab.errors import GemmalabError
from gemmalab.files import atomic_dir
from gemmalab.host_memory import keep_freed_memory
from gemmalab.model.gemma import Gemma
from gemmalab.runs import RunDir
from gemmalab.train.checkpoint import latest_complete, load_checkpoint, save_checkpoint
from gemmalab.train.config import CheckpointSection, DebugSection, ModelSpec, TrainSection
from gemmalab.train.debug import FaultInjector
from gemmalab.train.metrics import CarbonConfig, carbon, flops_per_token, memory_stats, mfu, peak_flops
from gemmalab.train.optim import OptimConfig, build_optimizer, build_scheduler
from gemmalab.train.parallel import DistInfo, parallelize, setup_distributed

__all__ = ["LossOutput", "Objective", "Batches", "LoopConfig", "Trainer", "StopFlag", "export_model", "jsonable"]

log = logging.getLogger(__name__)


@dataclass
class LossOutput:
    """One micro-batch's loss summed over its units (what to backprop; the loop scales it), and sums over the same
    units of the figures to log (the loop logs them divided by the step's units: means)."""

    loss: torch.Tensor
    figures: dict[str, torch.Tensor] = field(default_factory=dict)


class Objective(Protocol):
    def units(self, batch: Any) -> torch.Tensor:
        """What the loss of `batch` sums over (0-dim, on any device): target tokens, pairs, ..."""

    def tokens(self, batch: Any) -> int:
        """Input tokens the model reads for `batch` (throughput and MFU)."""

    def loss(self, model: nn.Module, batch: Any) -> LossOutput:
        """The loss of `batch`, summed over its units, and the figures to log (sums)."""


class Batches(Protocol):
    def __next__(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class LoopConfig(Protocol):
    """The sections of a stage config the loop reads (gemmalab.train.config)."""

    model: ModelSpec
    optim: OptimConfig
    train: TrainSection
    checkpoint: CheckpointSection
    carbon: CarbonConfig
    debug: DebugSection


class Trainer:
    """One training run into a run directory (see the module docstring).

    Without `resume`, a run directory that already holds checkpoints is refused rather than overwritten; with it,
    training continues from the newest complete checkpoint there (none: a fresh start).
    """

    def __init__(self, cfg: LoopConfig, out: str | Path, stage: str, resume: bool = False) -> None:
        self.cfg, self.stage = cfg, stage
        t = cfg.train
        if t.threads:
            torch.set_num_threads(t.threads)
        self.dist = _setup_distributed(t.device)
        if t.keep_freed_memory and self.dist.device.type == "cpu":
            keep_freed_memory()
        self.run = RunDir(out, stage)
        existing = latest_complete(self.run.checkpoints)
        if existing is not None and not resume:
            raise GemmalabError(f"{self.run.path} already has checkpoints from an earlier run; pass --resume to "
                                f"continue it, or choose another --out.")
        self.start = existing if resume else None
        _seed_everything(t.seed)  # objectives that sample (dropout, rollouts); a resumed run restores the RNG

    # ---- the model ----------------------------------------------------------------------------

    def build_model(self) -> tuple[Gemma, Any]:
        """(model, tokenizer) of `[model]` on this process's device, in fp32 (the master weights): a preset with
        seeded random weights (no tokenizer), or the weights and tokenizer of `init_from`. Built on the meta
        device and materialized where it runs, so no full copy is made per rank; the same weights whatever the
        device or world size."""
        spec, t, device = self.cfg.model, self.cfg.train, self.dist.device
        if spec.init_from is None:
            with torch.device("meta"):
                model = Gemma(spec.config)
            model.to_empty(device=device)
            model.init_weights(std=t.init_std, seed=t.seed)
            return model, None
        import gemmalab
        from gemmalab.checkpoint.common import build_model

        model, tokenizer = gemmalab.load(spec.init_from, dtype=torch.float32, device=device)
        if model.config != spec.config:  # [model] overrides of the loaded config (they must keep the shapes)
            model = build_model(spec.config, dict(model.state_dict()), spec.init_from, torch.float32, device)
        return model, tokenizer

    # ---- the loop -----------------------------------------------------------------------------

    def fit(self, model: nn.Module, objective: Objective, batches: Batches, *, seq_len: int,
            tokenizer: Any = None, progress: bool | None = None,
            export_state: Callable[[dict[str, torch.Tensor], Path], dict[str, torch.Tensor]] | None = None) -> dict:
        """Train `model` (from `build_model`) for `train.steps` steps; returns the run's figures:
        {"status": "finished" | "interrupted", "steps", "tokens", "final_loss", "seconds", "tokens_per_s", "mfu",
        "params", "world_size", "device", "carbon", "model_dir"}. On SIGTERM it checkpoints at the next step
        boundary and returns with status "interrupted" (no carbon, no export). `seq_len` is the row length for
        the FLOPs of attention in MFU; `tokenizer` goes into the exported model directory; `export_state(state, folder)` maps the
        trained model's full state dict to a plain Gemma's (LoRA: the adapters merged into the weights), and may
        write more files into the folder being exported (the reward model's head).
        Raises GemmalabError after `train.max_bad_steps` non-finite steps in a row.
        """
        cfg, d, run = self.cfg, self.dist, self.run
        t, ocfg = cfg.train, cfg.optim
        mc = cfg.model.config
        bf16 = t.dtype == torch.bfloat16
        model, autocast_bf16 = _parallelize(model, t, d)
        model.train()
        optimizer = build_optimizer(model, ocfg)
        scheduler = build_scheduler(optimizer, ocfg)

        step, elapsed, tokens_done = 0, 0.0, 0
        if self.start is not None:
            state = load_checkpoint(self.start, model, optimizer)
            scheduler.load_state_dict(state["scheduler"])
            batches.load_state_dict(state["loader"])
            step, elapsed, tokens_done = int(state["step"]), float(state["elapsed"]), int(state["tokens"])
            if d.is_main:
                log.info("resumed from %s (step %d)", self.start, step)
        if d.is_main:
            run.snapshot(cfg)
            run.trim_metrics(step)  # a fresh run: 0, so an old file is emptied
        logger = run.metrics() if d.is_main else None

        fpt = flops_per_token(mc, seq_len)
        peak, measured_peak = _peak(d.device, torch.bfloat16 if bf16 else torch.float32, t.peak_flops)
        amp = torch.autocast(d.device.type, dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
        faults = FaultInjector(cfg.debug, model, run.path, d.is_main)
        params = [p for p in model.parameters() if p.requires_grad]
        clip = ocfg.grad_clip if ocfg.grad_clip else math.inf

        def checkpoint(at: int) -> None:
            state = {"step": at, "elapsed": elapsed, "tokens": tokens_done, "loader": batches.state_dict(),
                     "scheduler": jsonable(scheduler.state_dict()), "world_size": d.world_size}
            save_checkpoint(run.checkpoints, at, model, optimizer, state, keep=cfg.checkpoint.keep,
                            after=faults.in_checkpoint(at, lambda: stop.signal is not None))  # `stop`: set below

        def mfu_of(tokens_per_s: float) -> float | None:
            if not peak or tokens_per_s <= 0:
                return None
            return float(mfu(tokens_per_s / d.world_size, fpt, peak, measured=measured_peak))

        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=step, unit="step", desc=self.stage, dynamic_ncols=True,
                   disable=(not d.is_main) or (None if progress is None else not progress))
        bad_in_row, last_loss, window_t, window_tokens = 0, None, 0.0, 0
        last_ckpt = step if self.start is not None else -1
        status = "finished"
        try:
            with StopFlag() as stop:
                while step < t.steps:
                    if stop.any_rank(d.device):
                        status = "interrupted"
                        break
                    t0 = time.perf_counter()
                    faults.start(step + 1)
                    micro = [next(batches) for _ in range(t.grad_accum)]
                    count = sum(objective.units(b) for b in micro).to(d.device, torch.float32)
                    if dist.is_initialized():
                        dist.all_reduce(count)
                    scale = d.world_size / count.clamp(min=1)
                    sums: dict[str, torch.Tensor] = {}
                    for i, b in enumerate(micro):
                        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce once, after the last one
                            model.set_requires_gradient_sync(i == len(micro) - 1)
                        with amp:
                            out = objective.loss(model, b)
                        (out.loss * scale).backward()
                        for name, value in {"loss": out.loss, **out.figures}.items():
                            value = value.detach().float().to(d.device)
                            sums[name] = sums[name] + value if name in sums else value
                    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                    totals = torch.stack(list(sums.values()))
                    if dist.is_initialized():
                        dist.all_reduce(totals)
                    means = dict(zip(sums, (totals / count.clamp(min=1)).tolist()))
                    loss = means["loss"]
                    gn = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                    lr = float(optimizer.param_groups[0]["lr"])
                    finite = math.isfinite(loss) and math.isfinite(gn)
                    if finite:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()  # also on skipped steps: the LR stays a function of the step number
                    step_tokens = sum(objective.tokens(b) for b in micro) * d.world_size
                    step += 1
                    tokens_done += step_tokens
                    dt = time.perf_counter() - t0
                    elapsed += dt
                    window_t += dt
                    window_tokens += step_tokens
                    bar.update(1)
                    if not finite:
                        bad_in_row += 1
                        reason = "non-finite loss" if not math.isfinite(loss) else "non-finite gradient norm"
                        if logger is not None:
                            logger.log(step, {"skipped": reason, "bad_steps_in_row": bad_in_row, "lr": lr})
                        log.warning("step %d: %s; update skipped (%d in a row)", step, reason, bad_in_row)
                        if bad_in_row >= t.max_bad_steps:
                            raise GemmalabError(
                                f"Training stopped at step {step}: {bad_in_row} non-finite steps in a row "
                                f"(train.max_bad_steps = {t.max_bad_steps}). Lower optim.lr, raise optim.warmup_steps "
                                f"or check the data; resume from the last checkpoint with --resume.")
                    else:
                        bad_in_row = 0
                        last_loss = loss
                        if step % t.log_every == 0 or step == t.steps:
                            tps = window_tokens / window_t if window_t > 0 else 0.0
                            record = {**means, "lr": lr, "grad_norm": gn, "tokens": tokens_done, "tokens_per_s": tps,
                                      "mfu": mfu_of(tps), **memory_stats(d.device), "step_time_s": dt}
                            if logger is not None:
                                logger.log(step, record)
                            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                            window_t, window_tokens = 0.0, 0
                    if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                        checkpoint(step)
                        last_ckpt = step
                    faults.end(step, lambda: stop.signal is not None)
                if last_ckpt != step and (cfg.checkpoint.at_end or status == "interrupted"):
                    checkpoint(step)  # the end, or a signal: leave a checkpoint of where we are
        finally:
            bar.close()
            faults.close()
            if logger is not None:
                logger.close()

        tps = tokens_done / elapsed if elapsed > 0 else 0.0
        result = {"status": status, "steps": step, "tokens": tokens_done, "final_loss": last_loss,
                  "seconds": elapsed, "tokens_per_s": tps, "mfu": mfu_of(tps), "params": mc.num_params(),
                  "world_size": d.world_size, "device": str(d.device)}
        if status == "interrupted":
            if d.is_main:
                log.warning("stopped by signal at step %d; checkpoint written; continue with --resume", step)
            return result
        result["carbon"] = carbon(elapsed, dataclasses.replace(cfg.carbon, num_devices=d.world_size))
        if cfg.checkpoint.export:
            export_model(model, mc, tokenizer, run.model_dir, d, export_state)
            result["model_dir"] = str(run.model_dir)
        return result


# ---- pieces -------------------------------------------------------------------------------------


def _setup_distributed(device: str) -> DistInfo:
    """torchrun: a process group via gemmalab.train.parallel; otherwise one process on `device` ("auto": CUDA if any)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return setup_distributed()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return DistInfo(0, 1, 0, torch.device(device))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _parallelize(model: nn.Module, t: TrainSection, d: DistInfo) -> tuple[nn.Module, bool]:
    """Activation checkpointing, compile and FSDP2 as configured; returns (model, autocast_bf16).

    Under FSDP2, bf16 is its mixed-precision policy (bf16 params in compute, fp32 master and reduce); without FSDP,
    bf16 is autocast over fp32 master weights (CPU and CUDA).
    """
    bf16 = t.dtype == torch.bfloat16
    distributed = dist.is_initialized()
    if distributed or t.activation_checkpointing or t.compile:
        model = parallelize(model, world_size=d.world_size, mixed_precision=bf16 and distributed,
                            activation_checkpointing=t.activation_checkpointing, compile=t.compile, device=d.device)
    return model, bf16 and not distributed


def _peak(device: torch.device, dtype: torch.dtype, override: float | None) -> tuple[float | None, bool]:
    """(peak FLOP/s of one device for MFU, whether it was measured here); (None, False) for an unknown GPU."""
    try:
        return peak_flops(device, dtype, override), override is None and device.type == "cpu"
    except GemmalabError as e:
        log.warning("MFU not logged: %s", e)
        return None, False


class StopFlag:
    """SIGTERM (and SIGINT) set a flag; the loop checkpoints at the next step boundary and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def any_rank(self, device: torch.device) -> bool:
        """Whether any rank was signalled (all ranks must stop at the same step)."""
        flag = self.signal is not None
        if dist.is_initialized():
            t = torch.tensor([1.0 if flag else 0.0], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag


def jsonable(obj: Any) -> Any:
    """Scheduler state as JSON (tensors to numbers, callables dropped: they are rebuilt from the config)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items() if not callable(v)}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return None


def export_model(model: nn.Module, mc, tokenizer, directory: Path, d: DistInfo, export_state=None) -> None:
    """The trained model as an HF model directory (rank 0 gathers the full fp32 weights)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from gemmalab.checkpoint.hf import save_hf

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.is_main:
        return
    try:
        with atomic_dir(directory) as tmp:  # a failed export leaves no half-written model beside result.json
            if export_state is not None:
                full = export_state(full, tmp)
            with torch.device("meta"):
                plain = Gemma(mc)
            plain.load_state_dict({k: v.float() for k, v in full.items()}, assign=True)
            save_hf(plain, tmp, tokenizer)
    except OSError as e:
        raise GemmalabError(f"The trained model could not be exported to {directory}: {e.strerror or e}. The "
                            "newest checkpoint is kept: free some space and continue with --resume.") from e
