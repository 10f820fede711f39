"""Language-model loss: the tied output projection and cross-entropy fused and tiled, so that the
[N, V] logits (V = 256k for Gemma) are never materialised.

`chunked_cross_entropy` is a custom autograd Function. Forward walks tiles of [chunk_size rows,
vocab_chunk_size columns], keeping only a running per-row logsumexp and the target logit. Backward
recomputes each tile's logits from the saved hidden states and weight, forms the softmax gradient
from the saved logsumexp, and accumulates grad_hidden [N, D] and grad_weight one vocabulary block at
a time, so the extra memory is one tile of logits plus one [vocab_chunk, D] fp32 accumulator.

Numerics: the matmul runs in the activation dtype (`hidden.dtype`; bf16 tensor cores accumulate in
fp32), exactly as the model's own `F.linear` would; every tile is upcast to fp32 before soft-capping,
logsumexp and softmax. An fp32 matmul for bf16 activations would be the "13x slower fp32 SGEMM" trap
of naive chunked losses (training-anchors-facts.md §4). `plain_cross_entropy` is the reference with
the same numerics that materialises everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gemmalab.errors import GemmalabError

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    """loss = ce + z_loss * z (what to backprop); ce: mean cross-entropy; z: mean logsumexp^2;
    n_tokens: non-ignored targets (0-dim long tensor, no host sync). Means are over non-ignored
    targets, or sums when reduction="sum" (for gradient accumulation over a global token count)."""

    loss: torch.Tensor
    ce: torch.Tensor
    z: torch.Tensor
    n_tokens: torch.Tensor


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
           vocab_chunk_size: int, softcap: float | None, z_loss: float, reduction: str) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise GemmalabError(
            f"Loss expects hidden [N, D], weight [V, D] and targets [N]; got shapes {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)} and {tuple(targets.shape)}."
        )
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != targets.shape[0]:
        raise GemmalabError(
            f"Loss shapes disagree: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)} (need hidden [N, D], weight [V, D], targets [N])."
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise GemmalabError(f"Loss targets must be integer token ids, got dtype {targets.dtype}.")
    if chunk_size <= 0 or vocab_chunk_size <= 0:
        raise GemmalabError(f"chunk_size and vocab_chunk_size must be positive, got {chunk_size} and {vocab_chunk_size}.")
    if softcap is not None and softcap <= 0:
        raise GemmalabError(f"softcap must be positive or None, got {softcap}.")
    if z_loss < 0:
        raise GemmalabError(f"z_loss must be >= 0, got {z_loss}.")
    if reduction not in ("mean", "sum"):
        raise GemmalabError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and lower precisions; fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _tile_logits(h: torch.Tensor, w: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits [n, v] of one tile (h and w already in the compute dtype), and tanh(z / c) if capped."""
    z = (h @ w.T).to(_acc_dtype(h.dtype))
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


class _ChunkedCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, vocab_chunk_size, softcap, z_loss, scale_by_count):
        N, V = hidden.shape[0], weight.shape[0]
        cd = hidden.dtype  # compute dtype of the matmuls: that of the activations, as autocast would choose
        acc = _acc_dtype(cd)
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, 0).long()
        lse = torch.empty(N, dtype=acc, device=hidden.device)
        target_logit = torch.empty(N, dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for r0 in range(0, N, chunk_size):
                h = hidden[r0:r0 + chunk_size]
                tgt = safe_targets[r0:r0 + chunk_size]
                m = torch.full((h.shape[0],), float("-inf"), dtype=acc, device=hidden.device)
                s = torch.zeros_like(m)
                tl = torch.zeros_like(m)
                for v0 in range(0, V, vocab_chunk_size):
                    z, _ = _tile_logits(h, weight[v0:v0 + vocab_chunk_size].to(cd), softcap)
                    # Online logsumexp: rescale the running sum to the new running max.
                    m_new = torch.maximum(m, z.amax(1))
                    s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(1)
                    m = m_new
                    inside = (tgt >= v0) & (tgt < v0 + z.shape[1])
                    picked = z.gather(1, (tgt - v0).clamp(0, z.shape[1] - 1)[:, None])[:, 0]
                    tl = torch.where(inside, picked, tl)
                lse[r0:r0 + chunk_size] = m + torch.log(s)
                target_logit[r0:r0 + chunk_size] = tl
        n_tokens = valid.sum()
        denom = n_tokens.clamp(min=1).to(acc) if scale_by_count else torch.ones((), dtype=acc, device=hidden.device)
        vf = valid.to(acc)
        ce = ((lse - target_logit) * vf).sum() / denom
        z = (lse.square() * vf).sum() / denom
        loss = ce + z_loss * z
        ctx.save_for_backward(hidden, weight, safe_targets, valid, lse, denom)
        ctx.conf = (chunk_size, vocab_chunk_size, softcap, z_loss)
        ctx.mark_non_differentiable(n_tokens)
        return loss, ce, z, n_tokens

    @staticmethod
    def backward(ctx, g_loss, g_ce, g_z, _g_n):
        hidden, weight, targets, valid, lse, denom = ctx.saved_tensors
        chunk_size, vocab_chunk_size, softcap, z_loss = ctx.conf
        N, V = hidden.shape[0], weight.shape[0]
        cd = hidden.dtype
        acc = lse.dtype
        zero = torch.zeros((), dtype=acc, device=hidden.device)
        g_loss = zero if g_loss is None else g_loss.to(acc)
        # dL/dce and dL/dz (loss = ce + z_loss * z): per-row weights of the softmax gradient.
        a = g_loss + (zero if g_ce is None else g_ce.to(acc))
        b = g_loss * z_loss + (zero if g_z is None else g_z.to(acc))
        vf = valid.to(acc)
        row_a = vf * a / denom  # d/dz_j of the CE part: row_a * (p_j - onehot_j)
        row_p = row_a + vf * b / denom * 2.0 * lse  # coefficient of p_j (CE + z-loss: d lse^2 = 2 lse p)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h32 = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.empty_like(weight) if need_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            for v0 in range(0, V, vocab_chunk_size):  # vocabulary block outer: grad_weight finishes block by block
                w = weight[v0:v0 + vocab_chunk_size].to(cd)
                gw32 = torch.zeros(w.shape, dtype=acc, device=w.device) if need_w else None
                for r0 in range(0, N, chunk_size):
                    h = hidden[r0:r0 + chunk_size]
                    rows = slice(r0, r0 + h.shape[0])
                    z, t = _tile_logits(h, w, softcap)
                    g = torch.exp(z - lse[rows, None]) * row_p[rows, None]  # [n, v] fp32
                    tgt = targets[rows] - v0
                    inside = (tgt >= 0) & (tgt < w.shape[0])
                    onehot_val = torch.where(inside, -row_a[rows], zero)
                    g.scatter_add_(1, tgt.clamp(0, w.shape[0] - 1)[:, None], onehot_val[:, None])
                    if t is not None:
                        g = g * (1.0 - t.square())  # d(c * tanh(x / c)) / dx
                    g = g.to(cd)
                    if need_h:
                        grad_h32[rows] += g @ w
                    if need_w:
                        gw32 += g.T @ h
                if need_w:
                    grad_w[v0:v0 + vocab_chunk_size] = gw32.to(weight.dtype)
        grad_h = grad_h32.to(hidden.dtype) if need_h else None
        return grad_h, grad_w, None, None, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          chunk_size: int = 4096, vocab_chunk_size: int = 32_768, softcap: float | None = None,
                          z_loss: float = 0.0, reduction: str = "mean") -> LossOutput:
    """Cross-entropy of logits = hidden @ weight.T (optionally soft-capped), never building [N, V].

    hidden: [N, D]; weight: [V, D] (the tied embedding); targets: [N] token ids, -100 to ignore.
    chunk_size rows and vocab_chunk_size columns make one tile; peak extra memory is a few fp32 tiles.
    z_loss adds z_loss * mean(logsumexp^2) to `loss` (PaLM's auxiliary loss keeping log Z near 0).
    reduction "mean" divides by the number of non-ignored targets (0 targets gives 0), "sum" does not.
    """
    _check(hidden, weight, targets, chunk_size, vocab_chunk_size, softcap, z_loss, reduction)
    loss, ce, z, n = _ChunkedCE.apply(hidden, weight, targets, chunk_size, vocab_chunk_size, softcap, float(z_loss),
                                      reduction == "mean")
    return LossOutput(loss, ce, z, n)


def plain_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                        chunk_size: int = 4096, vocab_chunk_size: int = 32_768, softcap: float | None = None,
                        z_loss: float = 0.0, reduction: str = "mean") -> LossOutput:
    """The reference: the same loss with the full [N, V] fp32 logits materialised (chunk sizes unused)."""
    _check(hidden, weight, targets, chunk_size, vocab_chunk_size, softcap, z_loss, reduction)
    with torch.autocast(hidden.device.type, enabled=False):
        acc = _acc_dtype(hidden.dtype)
        logits = F.linear(hidden, weight.to(hidden.dtype)).to(acc)  # [N, V]
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        valid = targets != IGNORE_INDEX
        n = valid.sum()
        denom = n.clamp(min=1).to(acc) if reduction == "mean" else torch.ones((), dtype=acc, device=hidden.device)
        logp = F.log_softmax(logits, -1)
        ce = F.nll_loss(logp, targets.long(), ignore_index=IGNORE_INDEX, reduction="sum") / denom
        # log Z = logit - log p at any column: read at the target, no second pass over [N, V]
        safe = targets.long().clamp(min=0)[:, None]
        lse = (logits.gather(-1, safe) - logp.gather(-1, safe))[:, 0]
        z = (lse.square() * valid.to(acc)).sum() / denom
    return LossOutput(ce + z_loss * z, ce, z, n)


def lm_loss(model: torch.nn.Module, tokens_in: torch.Tensor, targets: torch.Tensor,
            positions: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None, *,
            chunk_size: int = 4096, vocab_chunk_size: int = 32_768, z_loss: float = 0.0,
            reduction: str = "mean", plain_max_bytes: int = 256 * 2**20) -> LossOutput:
    """Next-token loss of a Gemma model: tokens_in [B, T] -> hidden [B*T, D] -> CE with the tied embedding and
    the model's final soft-cap. targets [B, T], -100 where no loss is wanted.

    Where the fp32 logits [B*T, V] take at most `plain_max_bytes`, they are built whole (one output-projection
    matmul fewer than the chunked loss, which recomputes each tile in backward); beyond it, the chunked loss
    never builds them. Both give the same loss and gradients (tested)."""
    if getattr(model, "lm_head", None) is not None:
        raise GemmalabError("lm_loss needs the tied output projection; this model has a separate (quantized) lm_head.")
    if tokens_in.shape != targets.shape:
        raise GemmalabError(f"tokens_in {tuple(tokens_in.shape)} and targets {tuple(targets.shape)} must have the same shape [B, T].")
    hidden = model(tokens_in, positions=positions, doc_ids=doc_ids, return_hidden=True)  # [B, T, D]
    weight = model.embed.weight
    if hasattr(weight, "full_tensor"):  # a sharded DTensor (FSDP/TP): gather it; gradients flow back sharded
        weight = weight.full_tensor()
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # A custom autograd Function is outside autocast: cast as autocast would for F.linear, or the output
        # projection (the largest matmul of the step) runs in fp32, several times slower.
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    loss = plain_cross_entropy if hidden[..., 0].numel() * weight.shape[0] * 4 <= plain_max_bytes else chunked_cross_entropy
    return loss(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size, softcap=model.config.final_softcap, z_loss=z_loss, reduction=reduction,
    )
