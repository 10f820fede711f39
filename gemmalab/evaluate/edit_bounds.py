"""Edit distances of the memorization audit, and lower bounds on them from a continuation still being generated.

A sample's verdicts (exact, approximate, character-level approximate) need its whole greedy continuation, but a
row can leave the batch early once lower bounds show that none of them can hold. The bounds here are sound for
*any* tokens that may still follow, so pruning never changes a verdict:

- tokens: `row[k]` = Levenshtein(generated so far (j tokens), target[:k]) is one row of the DP table. Any
  alignment of the final continuation (S tokens) with the target (S tokens) aligns the first j generated tokens
  with some target[:k], and the S - j still to come with the S - k left, which costs at least |k - j|. So
  distance >= min_k row[k] + |k - j|, which is row[j] (neighbouring entries differ by at most 1): the diagonal,
  tighter than the row's minimum.
- characters: the text decoded so far, A, is a prefix of the final text G (`stable_text`), so
  Levenshtein(G, T) >= b = min_k Levenshtein(A, T[:k]). rapidfuzz normalises by max(|G|, |T|), and |G| is not
  known yet; over every |G|, b / max(|G|, |T|) (with Levenshtein >= ||G| - |T||) is smallest at b / (|T| + b).
"""

from __future__ import annotations

import numpy as np

__all__ = ["first_row", "edit_row", "token_lower_bound", "char_lower_bound", "stable_text", "classify"]


def first_row(target_len: int) -> np.ndarray:
    """The DP row of an empty generated sequence: row[k] = k."""
    return np.arange(target_len + 1, dtype=np.int64)


def edit_row(row: np.ndarray, symbol: int, target: np.ndarray) -> np.ndarray:
    """The next DP row after one more generated symbol: row'[k] = Levenshtein(generated + [symbol], target[:k]).

    row: int64 [K + 1]; target: int64 [K] (token ids, or code points for characters). The recurrence
    row'[k] = min(row[k] + 1, row[k-1] + (target[k-1] != symbol), row'[k-1] + 1) has a chain along k (the
    insertions); row'[k] = k + cummin_i<=k (c[i] - i) resolves it in one vectorised pass, c being the first two terms.
    """
    c = np.empty_like(row)
    c[0] = row[0] + 1
    np.minimum(row[1:] + 1, row[:-1] + (target != symbol), out=c[1:])
    steps = np.arange(len(row), dtype=np.int64)
    return steps + np.minimum.accumulate(c - steps)


def token_lower_bound(row: np.ndarray, generated: int) -> int:
    """Fewest token edits the final continuation (as long as the target) can have, `generated` tokens in."""
    return int(row[min(generated, len(row) - 1)])


def char_lower_bound(row: np.ndarray, target_chars: int) -> float:
    """Smallest normalised character distance the final text can have, `row` being the DP row of a prefix of it."""
    b = int(row.min())
    return b / (target_chars + b) if b else 0.0


def stable_text(text: str) -> str:
    """The part of a partial decode that later tokens cannot change: without trailing U+FFFD, which an incomplete
    UTF-8 sequence of byte-fallback tokens decodes to until its last byte arrives."""
    return text.rstrip("\ufffd")


def classify(generated: list[int], target: list[int], max_distance: int) -> dict:
    """{"distance", "normalized", "exact", "approx"} of a whole continuation (rapidfuzz's Levenshtein on token ids)."""
    from rapidfuzz.distance import Levenshtein

    d = Levenshtein.distance(generated, target)
    return {"distance": d, "normalized": d / max(len(target), len(generated), 1), "exact": generated == target,
            "approx": d <= max_distance}
