"""TokenLoader: mixture proportions, exact resume, disjoint covering ranks, document positions."""

import json

import numpy as np
import pytest
import torch

from gemmalab.data.loader import TokenLoader
from gemmalab.data.mixture import Mixture, Stage
from gemmalab.data.packing import PackMeta, ShardWriter, pack
from gemmalab.errors import GemmalabError

BOS, EOS = 2, 1


def _synthetic(folder, sizes, *, seed=0, shard_tokens=5000):
    """Shards whose documents hold unique token values (BOS, unique ids >= 10, EOS), exactly `sizes[source]` tokens."""
    rng = np.random.default_rng(seed)
    meta = PackMeta(tokenizer_fingerprint="synthetic", vocab_size=2**31, bos_id=BOS, eos_id=EOS, seq_len=64)
    w = ShardWriter(folder, meta, shard_tokens)
    next_id = 10
    docs = []
    for source, size in sizes.items():
        left = size
        while left:
            n = min(left, int(rng.integers(3, 200)))
            if left - n < 3:  # keep every document at least BOS, one token, EOS
                n = left
            docs.append((source, n))
            left -= n
    rng.shuffle(docs)
    for source, n in docs:
        w.add([BOS, *range(next_id, next_id + n - 2), EOS], source)
        next_id += n - 2
    return w.close()


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    d = tmp_path_factory.mktemp("three")
    _synthetic(d, {"web": 60_000, "code": 25_000, "math": 9_000})
    return d


STAGED = Mixture([Stage(0.9, {"web": 0.6, "code": 0.3, "math": 0.1}),
                  Stage(1.0, {"web": 0.2, "code": 0.3, "math": 0.5})])


def test_mixture_proportions_over_1m_tokens(three):
    total, T, B = 1_000_000, 256, 8
    loader = TokenLoader(three, B, T, STAGED, total_tokens=total, seed=3)
    seen = [{}, {}]  # tokens per source in stage 0 and stage 1
    row = 0
    for batch in loader:
        for source in batch.sources:
            stage = 0 if row * T < 0.9 * total else 1
            seen[stage][source] = seen[stage].get(source, 0) + T
            row += 1
    assert row * T >= total and loader.num_batches == row // B
    for stage, counts in zip(STAGED.stages, seen):
        n = sum(counts.values())
        for source, w in stage.normalized().items():
            assert abs(counts[source] / n - w) < 0.02, (stage, counts)
    assert loader.epochs["math"] > 5  # the small source repeats: epochs follow one another


def test_resume_mid_epoch_yields_identical_batches(three):
    def make(batch_size=4):
        return TokenLoader([three], batch_size, 96, STAGED, total_tokens=40 * 4 * 96, seed=11)

    straight = list(make())
    assert len(straight) == 40
    first = make()
    for _ in range(17):  # 17 batches: mid-epoch of every source, before the stage change at 36
        next(first)
    assert all(0 < e < 1 for e in first.epochs.values())  # mid-epoch of every source
    state = json.loads(json.dumps(first.state_dict()))  # survives JSON (and torch.save)
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 40 - 17
    for a, b in zip(straight[17:], rest):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.positions, b.positions)
        assert torch.equal(a.doc_ids, b.doc_ids) and a.sources == b.sources
    uninterrupted = make()
    for _ in uninterrupted:
        pass
    assert resumed.state_dict() == uninterrupted.state_dict()


def test_state_is_the_same_on_every_rank(three):
    def make(rank):
        return TokenLoader(three, 2, 64, STAGED, total_tokens=30 * 4 * 64, rank=rank, world_size=2, seed=4)

    r0, r1 = make(0), make(1)
    for _ in range(9):
        next(r0), next(r1)
    assert r0.state_dict() == r1.state_dict()
    resumed = make(1)
    resumed.load_state_dict(r0.state_dict())  # one saved state serves every rank
    for a, b in zip(r1, resumed):
        assert torch.equal(a.tokens, b.tokens) and a.sources == b.sources


def test_two_ranks_disjoint_and_covering(tmp_path):
    T, B = 32, 2
    _synthetic(tmp_path, {"a": 48 * T, "b": 24 * T}, shard_tokens=700)  # 72 rows of T tokens in all
    total = 72 * T  # exactly one epoch of each source with the natural 2:1 weights

    def inputs(rank, world, batch):
        out = []
        for b in TokenLoader(tmp_path, batch, T, total_tokens=total, rank=rank, world_size=world, seed=5):
            out.append(b)
        return out

    r0, r1, single = inputs(0, 2, B), inputs(1, 2, B), inputs(0, 1, 2 * B)
    assert len(r0) == len(r1) == len(single) == 18
    seen = [set(), set()]
    for rank, batches in enumerate((r0, r1)):
        for b in batches:
            toks = b.inputs.flatten().tolist()
            seen[rank].update(t for t in toks if t >= 10)
    assert not seen[0] & seen[1]
    all_tokens = np.concatenate([np.fromfile(p, dtype="<u4") for p in sorted(tmp_path.glob("tokens-*.bin"))])
    everything = {int(t) for t in all_tokens if t >= 10}
    assert seen[0] | seen[1] == everything  # every document token is an input on exactly one rank
    for a, b, s in zip(r0, r1, single):  # and the two ranks together are the single-process batch
        assert torch.equal(torch.cat([a.tokens, b.tokens]), s.tokens)
        assert a.sources + b.sources == s.sources


def test_positions_restart_at_document_starts(three):
    batch = next(iter(TokenLoader(three, 4, 128, seed=1)))
    x, pos, doc = batch.inputs, batch.positions, batch.doc_ids
    assert x.shape == pos.shape == doc.shape == (4, 128) and batch.tokens.shape == (4, 129)
    assert torch.equal(batch.targets[:, :-1], x[:, 1:])
    starts = x == BOS
    starts[:, 0] = True
    assert torch.equal(pos == 0, starts)
    assert torch.all((pos[:, 1:] == pos[:, :-1] + 1) | starts[:, 1:])
    assert torch.equal(doc, torch.cumsum(starts.long(), 1) - 1)
    assert torch.all(x[:, 1:][starts[:, 1:] & (x[:, 1:] == BOS)] == BOS)
    assert torch.all(x[:, :-1][(x[:, 1:] == BOS)] == EOS)  # packed across documents: EOS then BOS


def test_packed_text_through_loader(tmp_path):
    from gemmalab.data.corpus import math_documents
    from gemmalab.tokenizer import train_tokenizer

    docs = tmp_path / "math.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in math_documents(150, seed=2)), encoding="utf-8")
    tok = train_tokenizer([docs], 350, tmp_path / "tok")
    meta = pack(docs, tok, tmp_path / "shards", seq_len=48, progress=False)
    loader = TokenLoader(tmp_path / "shards", 3, None, total_tokens=meta.num_tokens)
    assert loader.seq_len == 48
    for batch in loader:
        x = batch.inputs
        assert torch.equal((batch.positions == 0)[:, 1:], (x == tok.bos_id)[:, 1:])
    text = tok.decode(batch.tokens[0].tolist())
    assert "Answer" in text or "Problem" in text or "Solution" in text


def test_errors(three, tmp_path):
    with pytest.raises(GemmalabError, match="rank 2 is not in"):
        TokenLoader(three, 2, 16, rank=2, world_size=2)
    with pytest.raises(GemmalabError, match=r"names source\(s\) \['books'\]"):
        TokenLoader(three, 2, 16, Mixture.constant({"books": 1.0}))
    with pytest.raises(GemmalabError, match="needs total_tokens"):
        TokenLoader(three, 2, 16, STAGED)
    with pytest.raises(GemmalabError, match="not a packed token shard folder"):
        TokenLoader(tmp_path, 2, 16)
    other = TokenLoader(three, 2, 16, seed=1)
    with pytest.raises(GemmalabError, match="different token shards or another seed"):
        other.load_state_dict(TokenLoader(three, 2, 16, seed=2).state_dict())
