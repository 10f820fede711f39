"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

Schedules (all with linear warmup): "cosine" to min_lr_ratio * lr at total_steps; "wsd"
(warmup-stable-decay: flat, then a linear decay to min_lr_ratio * lr over the last decay_fraction
of the steps, as torchtitan's `decay_ratio` and nanochat's warmdown); "constant".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from gemmalab.errors import GemmalabError

SCHEDULES = ("cosine", "wsd", "constant")


@dataclass
class OptimConfig:
    """AdamW and schedule settings. Steps count optimizer steps (after gradient accumulation)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0  # max global grad norm; None or 0: no clipping
    schedule: str = "cosine"
    warmup_steps: int = 0
    total_steps: int | None = None  # None: the run's train.steps (a stage config fills it in)
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr (cosine and wsd)
    decay_fraction: float = 0.2  # wsd: the last decay_fraction * total_steps steps decay

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # TOML gives a list
        problems = []
        if self.schedule not in SCHEDULES:
            problems.append(f"`schedule` must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not self.lr > 0:
            problems.append(f"`lr` must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(f"`betas` must be two numbers in [0, 1), got {self.betas}")
        if self.eps <= 0 or self.weight_decay < 0:
            problems.append(f"`eps` must be positive and `weight_decay` >= 0, got {self.eps} and {self.weight_decay}")
        if self.grad_clip is not None and self.grad_clip < 0:
            problems.append(f"`grad_clip` must be >= 0 or unset, got {self.grad_clip}")
        total = self.warmup_steps if self.total_steps is None else self.total_steps  # unset: checked once set
        if total <= 0 and self.total_steps is not None or not 0 <= self.warmup_steps <= total:
            problems.append(f"need `total_steps` > 0 and 0 <= `warmup_steps` <= `total_steps`, got {self.warmup_steps} "
                            f"and {self.total_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"`min_lr_ratio` must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            problems.append(f"`decay_fraction` must be in [0, 1], got {self.decay_fraction}")
        elif self.schedule == "wsd" and self.total_steps and self.warmup_steps + self.decay_steps > self.total_steps:
            problems.append(f"wsd: `warmup_steps` ({self.warmup_steps}) + decay steps ({self.decay_steps}) exceed "
                            f"`total_steps` ({self.total_steps})")
        if problems:
            raise GemmalabError("Invalid optimizer config: " + "; ".join(problems) + ".")

    @property
    def decay_steps(self) -> int:
        """WSD: number of final steps that decay."""
        return round(self.decay_fraction * (self.total_steps or 0))

    def for_run(self, steps: int) -> OptimConfig:
        """This config with total_steps set to the run's `steps` if it was left unset."""
        return self if self.total_steps is not None else dataclasses.replace(self, total_steps=steps)


def lr_at(step: int, cfg: OptimConfig) -> float:
    """The learning rate of optimizer step `step` (0-based). After total_steps it stays at the final value."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps  # step 0 already moves; full lr at warmup_steps - 1
    if cfg.schedule == "constant":
        return cfg.lr
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(1, cfg.total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    decay_start = cfg.total_steps - cfg.decay_steps  # wsd
    if step < decay_start:
        return cfg.lr
    progress = min(1.0, (step - decay_start) / max(1, cfg.decay_steps))
    return cfg.lr * (1.0 - (1.0 - floor) * progress)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (>= 2-D: linear weights and the tied embedding) decay; vectors (norm
    scales, biases) do not. The training fact sheet gives no Gemma rule; this is nanoGPT's and torchtitan's."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """Fused AdamW needs every parameter floating-point on one device type that this torch has a fused kernel for."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # private helper moved: fall back to the long-supported ones
        devices = {"cuda", "cpu"}
    kinds = {p.device.type for p in params}
    return len(kinds) == 1 and kinds <= devices and all(p.is_floating_point() for p in params)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused when supported (one kernel for all parameters), else foreach."""
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise GemmalabError("The model has no trainable parameters to optimize.")
    groups = [g for g in groups if g["params"]]
    kind = {"fused": True} if _fused_supported(params) else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **kind)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> LambdaLR:
    """LambdaLR that sets every group's lr to lr_at(step, cfg); call scheduler.step() after optimizer.step()."""
    if cfg.total_steps is None:
        raise GemmalabError("The schedule needs optim.total_steps (OptimConfig.for_run(steps) sets it).")
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = cfg.lr
    return LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.lr)
