"""The arithmetic of policy optimisation against a reward model, as plain tensor functions (gemmalab.train.rlhf runs
them; tests check each against hand-computed cases). Formulas and defaults: TRL, OpenRLHF, torchtune (see
docs/alignment.md).

Shapes: `logp`, `ref_logp`, `values`, `mask` are [B, T] over response tokens (mask True on real ones); sequence
figures are [B]; RLOO groups are [P, k] (k samples of each of P prompts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gemmalab.errors import GemmalabError

__all__ = ["KL_ESTIMATORS", "kl_per_token", "whiten", "rloo_advantages", "rloo_loss", "gae", "ppo_policy_loss",
           "ppo_value_loss", "AdaptiveKL"]

KL_ESTIMATORS = ("k1", "k3")


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimates of KL(policy || reference) from the sampled tokens' log-probabilities (Schulman's
    estimators): k1 = log p - log q (unbiased, can be negative), k3 = (q/p - 1) - log(q/p) (unbiased, never
    negative, lower variance when the two are close). Their mean over samples from p is the exact KL."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_ratio = ref_logp - logp
        return torch.expm1(log_ratio) - log_ratio
    raise GemmalabError(f"the KL estimator is one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8
           ) -> torch.Tensor:
    """(x - mean) / std over the masked entries (all when mask is None); with shift_mean False the mean is added
    back (reward whitening keeps its sign)."""
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.bool()
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * m


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out: each of k samples of a prompt has the mean reward of the other k - 1 as its
    baseline. rewards [P, k] -> advantages [P, k] (k >= 2)."""
    k = rewards.shape[-1]
    if k < 2:
        raise GemmalabError("RLOO needs at least 2 samples per prompt (rlhf.samples_per_prompt)")
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


def rloo_loss(seq_logp: torch.Tensor, old_seq_logp: torch.Tensor, advantages: torch.Tensor, clip: float
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped sequence-level objective of TRL's RLOO, summed over the B sequences: -min(rho A, clip(rho) A)
    with rho = exp(sum_t log pi - sum_t log pi_old). Returns (loss sum, number of clipped sequences)."""
    ratio = torch.exp(seq_logp - old_seq_logp)
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = torch.maximum(-advantages * ratio, -advantages * clipped)
    return loss.sum(), ((ratio - clipped).abs() > 0).sum()


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses: delta_t = r_t + gamma V_{t+1} - V_t (V past the
    last real token is 0), A_t = sum_l (gamma lam)^l delta_{t+l}; returns (advantages, returns = A + V), zero on
    padding. rewards, values, mask: [B, T]."""
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        adv[:, t] = running
    return adv, (adv + values) * m


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, summed over the masked tokens: max(-A rho, -A clip(rho, 1 +- eps)), rho =
    exp(log pi - log pi_old). Returns (loss sum, number of clipped tokens)."""
    m = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = torch.maximum(-advantages * ratio, -advantages * clipped)
    return (loss * m).sum(), (((ratio - clipped).abs() > 0) & mask.bool()).sum()


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float) -> torch.Tensor:
    """The clipped value loss summed over the masked tokens: 1/2 max((V - R)^2, (clip(V, V_old +- eps) - R)^2)."""
    m = mask.to(values.dtype)
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return (loss * m).sum()


@dataclass
class AdaptiveKL:
    """Ziegler et al.'s controller: beta <- beta (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon), so the KL
    drifts toward `target`. Without a target, beta stays fixed."""

    beta: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n: int = 1) -> float:
        if self.target is not None and math.isfinite(kl):
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.beta *= 1 + error * n / self.horizon
        return self.beta
