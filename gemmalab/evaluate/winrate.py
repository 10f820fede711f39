"""Side-by-side statistics: one outcome per prompt from the verdicts of both answer orders, win / tie / loss counts,
the win rate with ties split, a seeded bootstrap interval over prompts, the position-flip rate and a
length-controlled win rate. A leaf: the side-by-side stage and the RLHF guard both use it.

Outcomes are from the test model's side: 1 win, 0.5 tie, 0 loss. The formulas (FastChat, alpaca_eval and the Gemma
report's tables) are in the alignment fact sheet:

    win_rate = (W + T/2) / N        (Gemma 1.1 7B instruction following: 52.2 / 18.1 / 29.7 -> 61.25 %)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["MODEL", "BASELINE", "TIE", "combine", "win_rate", "bootstrap_ci", "length_controlled_win_rate", "summarize"]

# A verdict in the model's terms (which answer the judge preferred, whatever seat it sat in).
MODEL, BASELINE, TIE = "model", "baseline", "tie"
_SCORE = {MODEL: 1.0, TIE: 0.5, BASELINE: 0.0}


def combine(first: str, second: str) -> str:
    """One prompt's outcome from its two verdicts (one per answer order): a win or a loss only when both orders
    agree, otherwise a tie (FastChat's rule: a judge that flips with the seats has not told the answers apart)."""
    for v in (first, second):
        if v not in _SCORE:
            raise ValueError(f"a verdict is one of {sorted(_SCORE)}, got {v!r}")
    return first if first == second else TIE


def win_rate(outcomes: Sequence[str]) -> float:
    """(W + T/2) / N; NaN for no outcomes."""
    return sum(_SCORE[o] for o in outcomes) / len(outcomes) if outcomes else math.nan


def bootstrap_ci(scores: Sequence[float], seed: int = 0, resamples: int = 2000, level: float = 0.95) -> list[float]:
    """The percentile bootstrap interval of the mean of per-prompt scores (prompts resampled with replacement,
    `seed`ed: the same data give the same interval). [nan, nan] for no scores."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    means = s[rng.integers(0, s.size, size=(resamples, s.size))].mean(axis=1)
    tail = (1 - level) / 2
    return [float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))]


def length_controlled_win_rate(scores: Sequence[float], length_deltas: Sequence[float], ridge: float = 1.0) -> float:
    """The win rate had both answers been equally long, in the manner of alpaca_eval's length-controlled GLM.

    Fits logit P(model wins) = a + theta * tanh(delta / rms(delta)) to the per-prompt scores (ties as 1/2) by
    Newton's method and predicts at delta = 0: sigmoid(a). `length_deltas` are len(model answer) - len(baseline
    answer) in characters. Two changes make it hold up on one small comparison: prompts where the model's answer is
    longer and those where it is shorter weigh the same in the fit (so a model that is longer most of the time does
    not have its length effect read as skill), and theta has a ridge penalty (a judge that always picks the longer
    answer separates the data perfectly; the fit stays finite). With no length differences it is the raw win rate.
    Unlike alpaca_eval there is no per-instruction difficulty term (one comparison, one judge).
    """
    y = np.asarray(scores, dtype=np.float64)
    d = np.asarray(length_deltas, dtype=np.float64)
    if y.size == 0:
        return math.nan
    scale = float(np.sqrt(np.mean(d**2)))
    if scale == 0:
        return float(y.mean())
    X = np.stack([np.ones_like(d), np.tanh(d / scale)], axis=1)  # [N, 2]
    weight = np.ones_like(d)
    longer, shorter = d > 0, d < 0
    if longer.any() and shorter.any():  # each side half of the weight of the prompts with a length difference
        weight[longer] = (longer | shorter).sum() / (2 * longer.sum())
        weight[shorter] = (longer | shorter).sum() / (2 * shorter.sum())
    penalty = np.diag([1e-6, ridge])  # the intercept is (almost) free
    w = np.zeros(2)
    for _ in range(200):
        p = 1 / (1 + np.exp(-(X @ w)))
        grad = X.T @ (weight * (y - p)) - penalty @ w
        hess = (X * (weight * p * (1 - p))[:, None]).T @ X + penalty
        step = np.linalg.solve(hess, grad)
        w += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + math.exp(-w[0])))


def summarize(outcomes: Sequence[str], flips: Sequence[bool], length_deltas: Sequence[float], seed: int = 0) -> dict:
    """The figures of one set of prompts: wins, ties, losses, n, win_rate, ci95, flip_rate, lc_win_rate."""
    outcomes = list(outcomes)
    scores = [_SCORE[o] for o in outcomes]
    n = len(outcomes)
    return {"n": n, "wins": outcomes.count(MODEL), "ties": outcomes.count(TIE), "losses": outcomes.count(BASELINE),
            "win_rate": win_rate(outcomes), "ci95": bootstrap_ci(scores, seed),
            "flip_rate": sum(flips) / n if n else math.nan,
            "lc_win_rate": length_controlled_win_rate(scores, length_deltas)}
