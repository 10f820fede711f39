"""gemmalab.train.parallel on CPU: FSDP2 over 2 gloo processes matches 1 process; checkpointing and compile.

The 2-process runs launch this file under `torchrun --standalone --nproc-per-node 2` (see `_worker`);
one launch trains fp32 and bf16-mixed-precision models and writes their losses to JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gemmalab.errors import GemmalabError
from gemmalab.model.config import get_preset
from gemmalab.model.gemma import Gemma
from gemmalab.train.loss import lm_loss
from gemmalab.train.parallel import all_reduce_sum, parallelize, setup_distributed, teardown

ROOT = Path(__file__).resolve().parents[1]
PRESET, STEPS, GLOBAL_ROWS, SEQ, LR = "tiny-gemma3", 5, 4, 32, 1e-2


def _batches(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fixed global batches: tokens [G, T+1], positions and doc_ids [G, T] (two packed documents per row)."""
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(STEPS):
        tokens = torch.randint(0, 16, (GLOBAL_ROWS, SEQ + 1), generator=gen) * (vocab // 16)  # learnable: 16 ids
        cut = torch.randint(4, SEQ - 4, (GLOBAL_ROWS, 1), generator=gen)  # second document starts here
        idx = torch.arange(SEQ).expand(GLOBAL_ROWS, SEQ)
        doc_ids = (idx >= cut).long()
        positions = torch.where(idx >= cut, idx - cut, idx)
        out.append((tokens, positions, doc_ids))
    return out


def _loss_sum(model: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of these rows (f32), so ranks can add theirs into a global mean.

    lm_loss applies the tied `embed.weight` to the hidden states outside the model's forward, which is
    what FSDP2 must get right for the tied weight (its gradient from both uses, reduced once).
    """
    return lm_loss(model, tokens[:, :-1], tokens[:, 1:], positions, doc_ids, reduction="sum").loss


def _train(model: torch.nn.Module, rank: int, world_size: int) -> list[float]:
    """STEPS of AdamW on this rank's rows of each global batch; returns the global mean loss per step.

    Each rank's loss is its token sum over the global token count, times world_size: FSDP averages
    gradients over ranks, so the result is the gradient of the global mean.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    rows = GLOBAL_ROWS // world_size
    losses = []
    for tokens, positions, doc_ids in _batches(model.config.vocab_size):
        sl = slice(rank * rows, (rank + 1) * rows)
        n_global = tokens[:, 1:].numel()  # every target counts here; a real loader sums n_tokens over ranks
        local = _loss_sum(model, tokens[sl], positions[sl], doc_ids[sl])
        (local * world_size / n_global).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(all_reduce_sum(local.detach()) / n_global))
    return losses


def _model(seed: int = 0) -> Gemma:
    torch.manual_seed(seed)
    model = Gemma(get_preset(PRESET))
    model.init_weights(seed=seed)
    return model


def _worker(out_path: str) -> None:
    """Body of each torchrun process; rank 0 writes the losses.

    fp32: plain FSDP2, to compare with one process. bf16: mixed precision and activation checkpointing
    together under FSDP2. (Compile is tested in one process below: inductor's first compile on 2 shared
    cores costs tens of seconds per process.)
    """
    torch.set_num_threads(1)
    info = setup_distributed()
    result: dict = {"world_size": info.world_size}
    for name, mp in (("fp32", False), ("bf16", True)):
        model = parallelize(_model(), world_size=info.world_size, mixed_precision=mp,
                            activation_checkpointing=mp, compile=False, device=info.device)
        result[name] = _train(model, info.rank, info.world_size)
        if name == "fp32":  # the tied output inside forward (logits) agrees with lm_loss's use of embed.weight
            tokens, positions, doc_ids = _batches(model.config.vocab_size)[0]
            per_rank = GLOBAL_ROWS // info.world_size
            rows = slice(info.rank * per_rank, (info.rank + 1) * per_rank)
            with torch.no_grad():
                logits = model(tokens[rows, :-1], positions=positions[rows], doc_ids=doc_ids[rows])
                via_logits = F.cross_entropy(logits.flatten(0, 1), tokens[rows, 1:].flatten(), reduction="sum")
                via_loss = _loss_sum(model, tokens[rows], positions[rows], doc_ids[rows])
            result["tied_logits_diff"] = float(all_reduce_sum((via_logits - via_loss).abs()))
        if name == "bf16":  # fp32 master weights: what the optimizer holds and updates
            result["bf16_param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
            result["names_unchanged"] = [n for n, _ in model.named_parameters()] == [n for n, _ in _model().named_parameters()]
            result["embed_is_sharded"] = type(model.embed.weight).__name__ == "DTensor"
    if info.rank == 0:
        Path(out_path).write_text(json.dumps(result))
    teardown()


@pytest.fixture(scope="module")
def two_rank_result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp") / "result.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(Path(__file__).resolve()), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def test_fsdp2_two_gloo_ranks_match_one_process(two_rank_result):
    reference = _train(_model(), rank=0, world_size=1)
    fsdp = two_rank_result["fp32"]
    assert two_rank_result["world_size"] == 2 and len(fsdp) == STEPS
    assert reference[-1] < reference[0] - 0.5  # it trains, so equal losses mean equal updates
    assert max(abs(a - b) for a, b in zip(fsdp, reference)) <= 1e-5, (fsdp, reference)
    assert two_rank_result["tied_logits_diff"] < 1e-3  # of a summed loss ~ 100


def test_fsdp2_bf16_mixed_precision_close_to_fp32(two_rank_result):
    fp32, bf16 = two_rank_result["fp32"], two_rank_result["bf16"]
    assert two_rank_result["bf16_param_dtypes"] == ["torch.float32"]
    assert two_rank_result["names_unchanged"] and two_rank_result["embed_is_sharded"]
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.05, (fp32, bf16)
    assert bf16 != fp32  # bf16 really was used


def test_checkpointing_and_compile_keep_loss_and_gradients():
    """Single process, no FSDP: checkpointed (and compiled) blocks give the plain model's loss and grads."""
    tokens, positions, doc_ids = _batches(512)[0]

    def loss_and_grads(**kw):
        model = parallelize(_model(), world_size=1, mixed_precision=False, device="cpu", **kw)
        loss = _loss_sum(model, tokens, positions, doc_ids) / tokens[:, 1:].numel()
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}

    loss0, grads0 = loss_and_grads(activation_checkpointing=False, compile=False)
    for kw, tol in (({"activation_checkpointing": True, "compile": False}, 0.0),
                    ({"activation_checkpointing": True, "compile": True}, 1e-5)):
        loss, grads = loss_and_grads(**kw)
        assert grads.keys() == grads0.keys()  # parameter names unchanged
        assert abs(loss - loss0) <= tol, kw
        for n, g in grads.items():
            torch.testing.assert_close(g, grads0[n], atol=tol or 1e-7, rtol=0, msg=lambda m: f"{kw} {n}: {m}")


def test_single_process_setup_and_errors(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = setup_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    with pytest.raises(GemmalabError, match="torchrun"):  # bf16 mixed precision is FSDP2's: needs a group
        parallelize(_model(), world_size=1, mixed_precision=True, activation_checkpointing=False, compile=False, device="cpu")
    with pytest.raises(GemmalabError, match="process group"):
        parallelize(_model(), world_size=2, mixed_precision=False, activation_checkpointing=False, compile=False, device="cpu")


if __name__ == "__main__":  # launched by torchrun from two_rank_result
    _worker(sys.argv[1])
