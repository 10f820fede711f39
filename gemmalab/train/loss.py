"""Language-model loss: the tied output projection and cross-entropy fused, in chunks of rows, so that the
[N, V] logits (V = 256k for Gemma) never exist whole unless they fit a budget.

`chunked_cross_entropy` is a custom autograd Function that computes the gradients in its forward pass (the loss
is the last operation of the graph, so its backward only scales them). When the fp32 logits of all rows fit in
one chunk, they are built once and turned into their own gradient in place: grad_logits = coef * softmax -
onehot / n, then grad_hidden = grad_logits @ W and grad_weight = grad_logits.T @ h; three matmuls and none of
the separate log-softmax, gather and scatter passes (and zero-filled [N, V] buffers) of a plain cross-entropy.
Otherwise chunks of rows give each row's logsumexp, and the gradient is formed one vocabulary block at a time for
all rows, recomputing that block's logits (four matmuls; memory: one fp32 tile, grad_hidden in fp32 and
grad_weight, with no fp32 [V, D] accumulator).

Numerics: the matmuls run in the activation dtype (`hidden.dtype`; bf16 matmuls accumulate in fp32), exactly as
the model's own `F.linear` would; logits are upcast to fp32 before soft-capping, logsumexp and softmax. An fp32
matmul for bf16 activations would be the "13x slower fp32 SGEMM" trap of naive chunked losses
(training-anchors-facts.md §4). `plain_cross_entropy` is the reference with the same numerics, written with
torch's own ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gemmalab.errors import GemmalabError

IGNORE_INDEX = -100


@dataclass
class LMLoss:
    """loss = ce + z_loss * z (what to backprop); ce: mean cross-entropy; z: mean logsumexp^2;
    n_tokens: non-ignored targets (0-dim long tensor, no host sync). Means are over non-ignored
    targets, or sums when reduction="sum" (for gradient accumulation over a global token count)."""

    loss: torch.Tensor
    ce: torch.Tensor
    z: torch.Tensor
    n_tokens: torch.Tensor


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
           softcap: float | None, z_loss: float, reduction: str) -> None:
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
    if chunk_size <= 0:
        raise GemmalabError(f"chunk_size must be positive, got {chunk_size}.")
    if softcap is not None and softcap <= 0:
        raise GemmalabError(f"softcap must be positive or None, got {softcap}.")
    if z_loss < 0:
        raise GemmalabError(f"z_loss must be >= 0, got {z_loss}.")
    if reduction not in ("mean", "sum"):
        raise GemmalabError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and lower precisions; fp64 stays fp64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _capped_logits(h: torch.Tensor, w: torch.Tensor, softcap: float | None, acc: torch.dtype):
    """fp32 logits h @ w.T of one tile, soft-capped if asked, and tanh(z / c) for the gradient (None if uncapped)."""
    z = (h @ w.T).to(acc)
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, t


def _logit_grad_(p: torch.Tensor, t: torch.Tensor | None, coef: torch.Tensor, index: torch.Tensor,
                 onehot: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """d loss / d logits of one tile from its softmax probabilities p [n, v] (overwritten): coef * p, plus `onehot`
    at column `index` of each row, through the soft-cap's tanh; in `dtype`, the matmuls' compute dtype."""
    g = p.mul_(coef[:, None])
    g.scatter_add_(1, index[:, None], onehot[:, None])
    if t is not None:
        g.mul_(1 - t.square())  # d(c * tanh(x / c)) / dx
    return g.to(dtype)


class _FusedCE(torch.autograd.Function):
    """Outputs (loss, ce, z, n_tokens); only `loss` is differentiable (ce and z are detached diagnostics)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, softcap, z_loss, scale_by_count, want_grad):
        N, V = hidden.shape[0], weight.shape[0]
        cd = hidden.dtype  # compute dtype of the matmuls: that of the activations, as autocast would choose
        acc = _acc_dtype(cd)
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, 0).long()
        n_tokens = valid.sum()
        denom = n_tokens.clamp(min=1).to(acc) if scale_by_count else torch.ones((), dtype=acc, device=hidden.device)
        vf = valid.to(acc)
        w = weight.to(cd)
        need_h, need_w = want_grad and ctx.needs_input_grad[0], want_grad and ctx.needs_input_grad[1]
        grad_h = grad_w = None
        with torch.autocast(hidden.device.type, enabled=False):
            if N <= chunk_size:
                # All rows in one chunk: the logits are built once and turned into their own gradient.
                z, t = _capped_logits(hidden, w, softcap, acc)  # [N, V]
                target_logit = z.gather(1, safe_targets[:, None])[:, 0]
                # One exponential per logit: softmax's largest entry is exp(max - lse), so lse = max - log(it)
                # (never underflows: it is at least 1 / V); torch.logsumexp, then exp(z - lse), took 2x as long.
                p = torch.softmax(z, dim=1)
                lse = z.amax(1) - torch.log(p.amax(1))
                del z
                if need_h or need_w:
                    g = _logit_grad_(p, t, vf * (1 + 2 * z_loss * lse) / denom, safe_targets, -vf / denom, cd)
                    grad_h = g @ w if need_h else None
                    grad_w = g.T @ hidden if need_w else None
            else:
                # Chunks of rows give each row's logsumexp; then the gradient is formed one vocabulary block at a
                # time for all rows (recomputing the logits: one more matmul, for bounded memory and an exact
                # grad_weight per block without an fp32 [V, D] accumulator).
                lse = torch.empty(N, dtype=acc, device=hidden.device)
                target_logit = torch.empty_like(lse)
                for r0 in range(0, N, chunk_size):
                    rows = slice(r0, min(r0 + chunk_size, N))
                    z, _ = _capped_logits(hidden[rows], w, softcap, acc)
                    target_logit[rows] = z.gather(1, safe_targets[rows, None])[:, 0]
                    lse[rows] = torch.logsumexp(z, dim=1)
                    del z
                if need_h or need_w:
                    grad_h32 = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
                    grad_w = torch.empty_like(weight) if need_w else None
                    coef = vf * (1 + 2 * z_loss * lse) / denom
                    block = max(1, chunk_size * V // N)  # the same tile size: [N, block] fp32
                    for v0 in range(0, V, block):
                        wb = w[v0:v0 + block]
                        z, t = _capped_logits(hidden, wb, softcap, acc)
                        p = z.sub_(lse[:, None]).exp_()
                        local = safe_targets - v0
                        inside = (local >= 0) & (local < wb.shape[0])
                        g = _logit_grad_(p, t, coef, local.clamp(0, wb.shape[0] - 1),
                                         torch.where(inside, -vf / denom, 0.0), cd)
                        if need_h:
                            grad_h32 += g @ wb
                        if need_w:
                            grad_w[v0:v0 + block] = g.T @ hidden
                    grad_h = grad_h32.to(cd) if need_h else None
        ce = ((lse - target_logit) * vf).sum() / denom
        z = (lse.square() * vf).sum() / denom
        loss = ce + z_loss * z
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(ce, z, n_tokens)
        return loss, ce, z, n_tokens

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_z, _g_n):
        grad_h, grad_w = ctx.saved_tensors
        scale = lambda grad: None if grad is None else grad * g_loss.to(grad.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w), None, None, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          chunk_size: int = 4096, softcap: float | None = None, z_loss: float = 0.0,
                          reduction: str = "mean") -> LMLoss:
    """Cross-entropy of logits = hidden @ weight.T (optionally soft-capped), `chunk_size` rows of logits at a time.

    hidden: [N, D]; weight: [V, D] (the tied embedding); targets: [N] token ids, -100 to ignore.
    z_loss adds z_loss * mean(logsumexp^2) to `loss` (PaLM's auxiliary loss keeping log Z near 0).
    reduction "mean" divides by the number of non-ignored targets (0 targets gives 0), "sum" does not.
    Gradients are computed in the forward pass (when grad mode is on); only `loss` can be backpropagated,
    `ce` and `z` come detached.
    """
    _check(hidden, weight, targets, chunk_size, softcap, z_loss, reduction)
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss, ce, z, n = _FusedCE.apply(hidden, weight, targets, chunk_size, softcap, float(z_loss), reduction == "mean",
                                    want_grad)
    return LMLoss(loss, ce, z, n)


def plain_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                        softcap: float | None = None, z_loss: float = 0.0, reduction: str = "mean") -> LMLoss:
    """The reference: the same loss from torch's own ops on the full [N, V] fp32 logits (all outputs
    differentiable)."""
    _check(hidden, weight, targets, 1, softcap, z_loss, reduction)
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
    return LMLoss(ce + z_loss * z, ce, z, n)


def lm_loss(model: torch.nn.Module, tokens_in: torch.Tensor, targets: torch.Tensor,
            positions: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None, *,
            z_loss: float = 0.0, reduction: str = "mean", chunk_bytes: int = 256 * 2**20) -> LMLoss:
    """Next-token loss of a Gemma model: tokens_in [B, T] -> hidden [B*T, D] -> CE with the tied embedding and
    the model's final soft-cap. targets [B, T], -100 where no loss is wanted.

    The loss builds fp32 logits for as many rows at a time as fit in `chunk_bytes` (all of them when they fit;
    at least one row; their softmax takes as much again), so memory stays bounded for any vocabulary and batch;
    see `chunked_cross_entropy`. Gradients are formed in the forward pass; backpropagate `loss` only."""
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
    return chunked_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk_size=loss_chunk_rows(weight.shape[0], chunk_bytes),
        softcap=model.config.final_softcap, z_loss=z_loss, reduction=reduction,
    )


def loss_chunk_rows(vocab_size: int, chunk_bytes: int) -> int:
    """Rows of fp32 logits [rows, vocab_size] that fit in chunk_bytes (at least 1)."""
    return max(1, chunk_bytes // (vocab_size * 4))
