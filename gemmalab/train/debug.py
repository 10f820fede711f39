"""Faults injected into a training run by tests (`[debug]`), kept out of the loop body: NaN activations on chosen
steps (the non-finite step handling) and a hang at a known step (kill -9 and SIGTERM at a known point)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from torch import nn

from gemmalab.train.config import DebugSection

__all__ = ["FaultInjector"]


class FaultInjector:
    """Calls from the loop: `start(step)` before a step's forward passes, `end(step, stopped)` after the step."""

    def __init__(self, cfg: DebugSection, model: nn.Module, out: Path, is_main: bool) -> None:
        self.cfg, self.out, self.is_main = cfg, out, is_main
        self.step = 0
        self._hook = None
        if cfg.nan_steps:
            embed = next(m for m in model.modules() if isinstance(m, nn.Embedding))  # the token embedding
            self._hook = embed.register_forward_hook(self._nan)

    def _nan(self, module, inputs, output):
        return output + float("nan") if self.step in self.cfg.nan_steps else output

    def start(self, step: int) -> None:
        self.step = step

    def end(self, step: int, stopped: Callable[[], bool]) -> None:
        """At `hang_at_step`: mark OUT/hang-STEP and wait until a signal arrives (`stopped()` turns true)."""
        if step == self.cfg.hang_at_step:
            if self.is_main:
                (self.out / f"hang-{step}").touch()
            while not stopped():
                time.sleep(0.05)

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
