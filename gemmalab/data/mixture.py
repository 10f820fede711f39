"""Staged data mixtures: source weights per training stage, chosen by the fraction of tokens seen.

A stage covers the tokens from the previous stage's `until` (0 for the first) up to its own
`until`, as fractions of the run's total tokens. For example, upweight high-quality sources in
the last 10%::

    [[data.mixture.stages]]
    until = 0.9
    weights = { web = 0.7, code = 0.2, math = 0.1 }

    [[data.mixture.stages]]
    until = 1.0
    weights = { web = 0.4, code = 0.3, math = 0.3 }
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gemmalab.errors import GemmalabError

__all__ = ["Stage", "Mixture"]


@dataclass
class Stage:
    """Source weights (any positive scale; normalized on use) up to `until` (fraction of total tokens)."""

    until: float
    weights: dict[str, float]

    def __post_init__(self) -> None:
        if not isinstance(self.weights, Mapping) or not self.weights:
            raise GemmalabError(f"mixture stage until={self.until}: 'weights' must be a non-empty table of source = weight")
        for name, w in self.weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise GemmalabError(f"mixture stage until={self.until}: weight of source {name!r} must be a "
                                    f"finite number >= 0, got {w!r}")
        if sum(self.weights.values()) <= 0:
            raise GemmalabError(f"mixture stage until={self.until}: at least one weight must be positive")
        self.weights = {str(k): float(v) for k, v in self.weights.items()}

    def normalized(self) -> dict[str, float]:
        """Weights scaled to sum to 1, zero-weight sources left out."""
        total = sum(self.weights.values())
        return {k: v / total for k, v in self.weights.items() if v > 0}


@dataclass
class Mixture:
    """Stages in order; `until` increases strictly and the last stage ends at 1.0."""

    stages: list[Stage] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.stages:
            raise GemmalabError("a mixture needs at least one stage")
        prev = 0.0
        for i, st in enumerate(self.stages):
            if not isinstance(st, Stage):
                raise GemmalabError(f"mixture stage {i} must be a Stage, got {type(st).__name__}")
            u = st.until
            if isinstance(u, bool) or not isinstance(u, (int, float)) or not prev < u <= 1.0:
                raise GemmalabError(f"mixture stage {i}: 'until' must be in ({prev}, 1.0] and larger than the "
                                    f"previous stage's, got {u!r}")
            prev = float(u)
        if prev != 1.0:
            raise GemmalabError(f"mixture: the last stage must have until = 1.0, got {prev}")

    @classmethod
    def from_dict(cls, data: Mapping) -> Mixture:
        """A mixture from a parsed TOML/JSON table ``{"stages": [{"until": ..., "weights": {...}}, ...]}``."""
        if not isinstance(data, Mapping) or not isinstance(data.get("stages"), list):
            raise GemmalabError("mixture config: expected a table with a 'stages' array of tables")
        stages = []
        for i, st in enumerate(data["stages"]):
            if not isinstance(st, Mapping) or set(st) != {"until", "weights"}:
                raise GemmalabError(f"mixture config: stages[{i}] must have exactly the fields 'until' and "
                                    f"'weights', got {sorted(st) if isinstance(st, Mapping) else st!r}")
            stages.append(Stage(until=st["until"], weights=dict(st["weights"]) if isinstance(st["weights"], Mapping)
                                else st["weights"]))
        return cls(stages)

    @classmethod
    def from_toml(cls, table: Mapping, where: str = "", key: str = "") -> Mixture:
        """`from_dict`, for gemmalab.config (errors are reported with the file and table)."""
        return cls.from_dict(table)

    def to_toml(self) -> dict:
        return self.to_dict()

    @classmethod
    def constant(cls, weights: Mapping[str, float]) -> Mixture:
        """One stage with these weights for the whole run."""
        return cls([Stage(1.0, dict(weights))])

    def to_dict(self) -> dict:
        return {"stages": [{"until": s.until, "weights": dict(s.weights)} for s in self.stages]}

    @property
    def sources(self) -> list[str]:
        """Every source named in any stage, sorted."""
        return sorted({k for st in self.stages for k in st.weights})

    def check_sources(self, available: Iterable[str]) -> None:
        """GemmalabError naming any source with a positive weight that the data does not have."""
        have = set(available)
        for i, st in enumerate(self.stages):
            missing = sorted(k for k, v in st.weights.items() if v > 0 and k not in have)
            if missing:
                raise GemmalabError(f"mixture stage {i} (until={st.until}) names source(s) {missing} that the token "
                                    f"shards do not have; available: {sorted(have)}")

    def stage_index(self, tokens_seen: int, total_tokens: int) -> int:
        """The stage in force after `tokens_seen` of `total_tokens` (the last one past the end)."""
        if total_tokens <= 0:
            raise GemmalabError(f"total_tokens must be positive, got {total_tokens}")
        frac = tokens_seen / total_tokens
        for i, st in enumerate(self.stages):
            if frac < st.until:
                return i
        return len(self.stages) - 1

    def weights_at(self, tokens_seen: int, total_tokens: int) -> dict[str, float]:
        """Normalized weights (summing to 1, zero weights left out) in force after `tokens_seen` tokens."""
        return self.stages[self.stage_index(tokens_seen, total_tokens)].normalized()
