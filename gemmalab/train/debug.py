"""Faults injected into a training run by tests (`[debug]`), kept out of the loop body: NaN activations on chosen
steps (the non-finite step handling) and a hang at a known step or inside its checkpoint write (kill -9 and SIGTERM at
a known point)."""

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
        """After step `hang_at_step` (unless the hang is inside its checkpoint): hang."""
        if step == self.cfg.hang_at_step and not self.cfg.hang_in_checkpoint:
            self._hang(step, stopped)

    def in_checkpoint(self, step: int, stopped: Callable[[], bool]) -> Callable[[str], None]:
        """The `after` hook for the write of checkpoint `step` (gemmalab.train.checkpoint.save_checkpoint): it hangs
        after the phase `hang_in_checkpoint` of step `hang_at_step`'s checkpoint."""
        def after(phase: str) -> None:
            if step == self.cfg.hang_at_step and phase == self.cfg.hang_in_checkpoint:
                self._hang(step, stopped)
        return after

    def _hang(self, step: int, stopped: Callable[[], bool]) -> None:
        """Mark OUT/hang-STEP and wait until a signal arrives (`stopped()` turns true)."""
        if self.is_main:
            (self.out / f"hang-{step}").touch()
        while not stopped():
            time.sleep(0.05)

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
