"""The inference engine: batching and retiring rows, per-row seeds, stop strings, streaming, logprobs, scoring."""

import copy

import pytest
import torch

from gemmalab.inference import Engine, SamplingParams
from gemmalab.inference.stream import TextStream
from gemmalab.model import Gemma, get_preset
from gemmalab.model.quant import quantize


class IdTokenizer:
    """Test double: text is space-separated ids."""

    stop_ids = (1, 106)

    def encode(self, text, bos=True):
        return [2] * bos + [int(t) for t in text.split()]

    def decode(self, ids):
        return "".join(f" {i}" for i in ids)


@pytest.fixture(scope="module")
def engine():
    model = Gemma(get_preset("tiny-gemma2"))  # soft-capping and sliding window (8) on the hand-written path
    model.init_weights(std=0.3, seed=0)
    return Engine(model.eval(), IdTokenizer(), max_batch_size=3)


PROMPTS = ["17 99 310", "5 6 7 8 9 10 11 12 13 14 15", "400", "8 8 8 8", "300 200 100 50 25 12 6"]


def test_batches_and_retired_rows_give_the_same_greedy_tokens(engine):
    params = [SamplingParams(max_new_tokens=n, stop_ids=()) for n in (3, 20, 9, 1, 14)]
    batched = engine.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, batched):
        alone = Engine(engine.model, engine.tokenizer, max_batch_size=1).generate([prompt], p)[0]
        assert out.ids == alone.ids and len(out.ids) == p.max_new_tokens and out.finish_reason == "length"


def test_rows_stopping_early_retire_without_disturbing_the_others(engine):
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, stop_ids=()))
    stop = free[1].ids[2]  # make row 1 stop early; other rows stop wherever they meet that token
    stopped = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, stop_ids=(stop,)))
    for f, s in zip(free, stopped):
        expected = f.ids[: f.ids.index(stop)] if stop in f.ids else f.ids
        assert s.ids == expected
        assert s.finish_reason == ("stop" if stop in f.ids else "length")


def test_a_seed_gives_the_same_sample_whatever_the_batch(engine):
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, seed=7, stop_ids=())
    alone = engine.generate(["17 99"], p)[0].ids
    others = SamplingParams(max_new_tokens=10, temperature=1.0, seed=1, stop_ids=())
    mixed = engine.generate(["5 5 5", "17 99", "400"], [others, p, others])[1].ids
    assert alone == mixed
    assert engine.generate(["17 99"], SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, seed=8, stop_ids=()))[0].ids != alone


def test_stop_strings_cut_the_text_and_streaming_never_shows_them(engine):
    free = engine.generate(["17 99"], SamplingParams(max_new_tokens=10, stop_ids=()))[0]
    stop = f" {free.ids[3]} {free.ids[4]}"
    streamed = []
    out = engine.generate(["17 99"], SamplingParams(max_new_tokens=10, stop=(stop,), stop_ids=()),
                          on_token=lambda i, delta, reason: streamed.append((delta, reason)))[0]
    assert out.text == free.text[: free.text.index(stop)] and out.finish_reason == "stop"
    assert "".join(d for d, _ in streamed) == out.text
    assert [r for _, r in streamed][-1] == "stop" and all(r is None for _, r in streamed[:-1])


def test_logprobs_are_those_of_a_plain_forward_pass(engine):
    out = engine.generate(["17 99 310"], SamplingParams(max_new_tokens=6, stop_ids=(), logprobs=True))[0]
    seq = torch.tensor([out.prompt_ids + out.ids])
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(seq).float(), -1)[0]
    expected = [float(logp[len(out.prompt_ids) - 1 + t, tok]) for t, tok in enumerate(out.ids)]
    torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(expected), rtol=1e-5, atol=1e-5)


def test_scores_equal_a_plain_forward_pass_of_each_pair(engine):
    pairs = [("17 99", "310 4"), ("5 6 7 8 9 10 11 12 13 14 15", "1 2 3"), ("400", "17"), ([2, 8, 8], [8] * 11),
             ("5 6", "7 8"), ("1", "2 3 4"), ("9 9 9", "9"), ("44 45 46 47", "48 49 50 51")]  # four of length 5
    scores = engine.score(pairs, batch_size=3)
    for (ctx, cont), score in zip(pairs, scores):
        ctx_ids = engine.tokenizer.encode(ctx) if isinstance(ctx, str) else ctx
        cont_ids = engine.tokenizer.encode(cont, bos=False) if isinstance(cont, str) else cont
        with torch.no_grad():
            logp = torch.log_softmax(engine.model(torch.tensor([ctx_ids + cont_ids])).float(), -1)[0]
        rows = logp[len(ctx_ids) - 1: -1]
        expected = rows.gather(-1, torch.tensor(cont_ids)[:, None])[:, 0]
        assert torch.equal(torch.tensor(score.token_logprobs), expected)  # exactly the same numbers
        assert score.is_greedy == bool((rows.argmax(-1) == torch.tensor(cont_ids)).all())
    batched = engine.score(pairs, batch_size=3, exact=False)  # equal lengths stacked: the same up to the last bits
    for a, b in zip(scores, batched):
        assert b.logprob == pytest.approx(a.logprob, rel=1e-5, abs=1e-5)
    greedy = engine.generate(["17 99"], SamplingParams(max_new_tokens=3, stop_ids=()))[0].ids
    assert engine.score([("17 99", greedy)])[0].is_greedy


class ByteTokenizer:
    """Test double: ids are UTF-8 bytes; an incomplete sequence decodes to U+FFFD."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_stream_holds_back_incomplete_characters_and_stop_prefixes():
    stream = TextStream(ByteTokenizer(), stop=("END",))
    deltas = [stream.push(b) for b in "héllo EN".encode()]
    assert "".join(deltas) == "héllo "  # 'EN' might start 'END'; the half of 'é' was never shown as U+FFFD
    assert stream.push(ord("D")) == "" and stream.stopped and stream.text == "héllo "
    other = TextStream(ByteTokenizer(), stop=("END",))
    assert "".join(other.push(b) for b in b"ENX") == "ENX"  # not a stop after all: released


def test_compiled_decode_step_gives_the_same_tokens_and_follows_weight_updates(engine):
    params = [SamplingParams(max_new_tokens=n, stop_ids=()) for n in (5, 12)]
    plain = engine.generate(PROMPTS[:2], params)
    compiled_engine = Engine(engine.model, engine.tokenizer, max_batch_size=2, compile=True)
    assert [c.ids for c in compiled_engine.generate(PROMPTS[:2], params)] == [p.ids for p in plain]
    # A full-precision model may be trained between generations (RLHF rollouts): its weights must not be frozen
    # into the compiled step.
    model = copy.deepcopy(engine.model)
    compiled_engine = Engine(model, engine.tokenizer, max_batch_size=2, compile=True)
    compiled_engine.generate(PROMPTS[:2], params)
    model.init_weights(std=0.05, seed=2)  # in place, as an optimizer step would
    updated = Engine(model, engine.tokenizer, max_batch_size=2).generate(PROMPTS[:2], params)
    assert [c.ids for c in updated] != [p.ids for p in plain]
    assert [c.ids for c in compiled_engine.generate(PROMPTS[:2], params)] == [u.ids for u in updated]


def test_compiled_quantized_decode_step_matches_the_eager_one():
    """Quantized models compile with frozen weights and autotuned CPU kernels (Inductor's own weight-only GEMMs):
    the same tokens and log-probabilities as the eager int8 kernels, for two models of the same shapes in turn
    (a compile cache keyed by shapes alone would hand the second one the first one's weights)."""
    params = [SamplingParams(max_new_tokens=n, stop_ids=(), logprobs=True) for n in (6, 10)]
    for seed in (1, 3):
        model = Gemma(get_preset("tiny-gemma2"))
        model.init_weights(std=0.05, seed=seed)
        model = quantize(model.to(torch.bfloat16), "int8")
        eager = Engine(model, IdTokenizer(), max_batch_size=2).generate(PROMPTS[1:3], params)
        compiled_engine = Engine(model, IdTokenizer(), max_batch_size=2, compile=True)
        assert compiled_engine._compile_config is not None  # the frozen-weights path is the one under test
        compiled = compiled_engine.generate(PROMPTS[1:3], params)
        assert [c.ids for c in compiled] == [e.ids for e in eager]
        assert len({tuple(e.ids) for e in eager}) == 2 and len(set(eager[1].ids)) > 1  # not one repeated token
        for c, e in zip(compiled, eager):
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(e.logprobs), atol=0.03, rtol=0)


def test_the_engine_leaves_a_training_model_in_training_mode():
    """Generating or scoring with a model being trained (RL rollouts, held-out checks) runs it in eval mode and gives
    every module back its own mode, including one the caller had set apart."""
    model = Gemma(get_preset("tiny-gemma")).train()
    model.init_weights(std=0.3, seed=0)
    model.layers[0].eval()  # a frozen block, say
    seen = []
    model.layers[1].register_forward_pre_hook(lambda m, args: seen.append(m.training))
    engine = Engine(model, IdTokenizer(), max_batch_size=2)
    assert model.training  # creating an engine changes nothing
    engine.generate(["5 6 7"], SamplingParams(max_new_tokens=2, stop_ids=()))
    engine.score([("5 6", "7")])
    assert seen and not any(seen)  # in eval mode while it ran
    assert model.training and model.layers[1].training and not model.layers[0].training


def test_argmax_is_torchs_argmax_ties_included():
    from gemmalab.inference.engine import argmax

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        tied = torch.randint(0, 4, (8, 5000), generator=gen).to(dtype)  # every row has many maxima
        assert torch.equal(argmax(tied), tied.argmax(-1))
        assert torch.equal(argmax(tied[0]), tied[0].argmax())
