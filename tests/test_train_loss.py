"""The fused, chunked linear + cross-entropy equals the plain computation, in value and in gradients."""

import pytest
import torch
import torch.nn.functional as F

from gemmalab.errors import GemmalabError
from gemmalab.model.config import get_preset
from gemmalab.model.gemma import Gemma
from gemmalab.train.loss import chunked_cross_entropy, lm_loss, plain_cross_entropy


def _case(n=37, d=24, v=101, dtype=torch.float32, ignore=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=gen) * 2).to(dtype).requires_grad_()
    weight = torch.randn(v, d, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[list(ignore)] = -100
    return hidden, weight, targets


def _run(fn, hidden, weight, targets, **kw):
    hidden.grad = weight.grad = None
    out = fn(hidden, weight, targets, **kw)
    (out.loss * 0.75).backward()  # an upstream gradient other than 1 (the trainer scales the loss too)
    return out, hidden.grad.clone(), weight.grad.clone()


def _assert_same(a, b, rtol, atol):
    """Elementwise rtol, plus atol relative to the tensor's largest entry (summation order differs)."""
    (oa, ha, wa), (ob, hb, wb) = a, b
    for x, y in ((oa.loss, ob.loss), (oa.ce, ob.ce), (oa.z, ob.z), (ha, hb), (wa, wb)):
        x, y = x.float(), y.float()
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol * float(y.detach().abs().max()))
    assert int(oa.n_tokens) == int(ob.n_tokens)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 64])  # one row per chunk ... all rows in one
@pytest.mark.parametrize("softcap, z_loss", [(None, 0.0), (3.0, 0.0), (None, 1e-2), (2.5, 1e-1)])
def test_chunked_equals_plain_fp32(chunk_size, softcap, z_loss):
    hidden, weight, targets = _case(ignore=(0, 5, 36))
    kw = dict(softcap=softcap, z_loss=z_loss)
    plain = _run(plain_cross_entropy, hidden, weight, targets, **kw)
    chunked = _run(chunked_cross_entropy, hidden, weight, targets, chunk_size=chunk_size, **kw)
    _assert_same(chunked, plain, rtol=1e-5, atol=5e-6)
    assert int(chunked[0].n_tokens) == 34


def test_only_loss_is_differentiable_and_no_grad_computes_no_gradients():
    hidden, weight, targets = _case()
    out = chunked_cross_entropy(hidden, weight, targets, chunk_size=8)
    assert out.loss.requires_grad and not out.ce.requires_grad and not out.z.requires_grad
    with torch.no_grad():
        quiet = chunked_cross_entropy(hidden, weight, targets, chunk_size=8)
    assert not quiet.loss.requires_grad
    torch.testing.assert_close(quiet.loss, out.loss.detach(), rtol=0, atol=0)


def test_plain_matches_torch_cross_entropy_and_sum_reduction():
    hidden, weight, targets = _case(ignore=(3,))
    out = chunked_cross_entropy(hidden, weight, targets, chunk_size=8)
    ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-100)
    torch.testing.assert_close(out.ce, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
    summed = chunked_cross_entropy(hidden, weight, targets, chunk_size=8, reduction="sum")
    torch.testing.assert_close(summed.ce, ref * 36, rtol=1e-6, atol=1e-5)


def test_all_targets_ignored_gives_zero_loss_and_grads():
    hidden, weight, targets = _case(n=4)
    targets[:] = -100
    out, gh, gw = _run(chunked_cross_entropy, hidden, weight, targets, chunk_size=3)
    assert float(out.loss.detach()) == 0.0 and int(out.n_tokens) == 0
    assert not gh.any() and not gw.any()


@pytest.mark.parametrize("chunk_size", [24, 64])  # vocabulary blocks, and all 64 rows in one chunk
def test_bf16_close_to_fp32_and_to_plain_bf16(chunk_size):
    hidden, weight, targets = _case(n=64, d=32, v=300, ignore=(1,))
    ref = _run(plain_cross_entropy, hidden, weight, targets, softcap=30.0, z_loss=1e-3)
    hb, wb = (x.detach().bfloat16().requires_grad_() for x in (hidden, weight))
    plain_bf16 = _run(plain_cross_entropy, hb, wb, targets, softcap=30.0, z_loss=1e-3)
    chunked_bf16 = _run(chunked_cross_entropy, hb, wb, targets, chunk_size=chunk_size, softcap=30.0, z_loss=1e-3)
    assert chunked_bf16[1].dtype == torch.bfloat16 and chunked_bf16[2].dtype == torch.bfloat16
    _assert_same(chunked_bf16, plain_bf16, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(chunked_bf16[0].loss, ref[0].loss, rtol=2e-2, atol=0)


def test_mixed_dtypes_bf16_activations_fp32_master_weight():
    hidden, weight, targets = _case(n=16, d=16, v=50)
    hb = hidden.detach().bfloat16().requires_grad_()
    out = chunked_cross_entropy(hb, weight, targets, chunk_size=5)
    out.loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    ref = plain_cross_entropy(hb, weight, targets)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)


def test_gradcheck_double():
    hidden, weight, targets = _case(n=6, d=4, v=9, dtype=torch.float64, ignore=(2,))

    def f(h, w):
        return chunked_cross_entropy(h, w, targets, chunk_size=4, softcap=2.0, z_loss=0.1).loss

    assert torch.autograd.gradcheck(f, (hidden, weight), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk_bytes", [1, 2**30])  # one row per chunk, and all rows in one
@pytest.mark.parametrize("preset", ["tiny-gemma", "tiny-gemma2"])
def test_lm_loss_equals_cross_entropy_on_model_logits(preset, chunk_bytes):
    torch.manual_seed(0)
    model = Gemma(get_preset(preset))
    model.init_weights(std=0.1, seed=0)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12))
    tokens_in, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets[0, :3] = -100
    out = lm_loss(model, tokens_in, targets, chunk_bytes=chunk_bytes)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(tokens_in)  # [B, T, V], soft-capped for gemma2
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_bad_shapes_raise_clear_errors():
    hidden, weight, targets = _case()
    with pytest.raises(GemmalabError, match="disagree"):
        chunked_cross_entropy(hidden, weight[:, :5], targets)
    with pytest.raises(GemmalabError, match="chunk_size"):
        chunked_cross_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(GemmalabError, match="reduction"):
        chunked_cross_entropy(hidden, weight, targets, reduction="none")
