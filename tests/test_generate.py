"""Generation with the KV cache against a plain forward loop; batching, sampling and stopping."""

import pytest
import torch

from gemmalab import GemmalabError, generate
from gemmalab.inference.engine import SamplingParams, sample_row
from gemmalab.model import Gemma, get_preset


class IdTokenizer:
    """Test double: text is space-separated ids, so prompts and outputs are easy to read."""

    stop_ids = (1, 106)

    def encode(self, text, bos=True):
        return [2] * bos + [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def model():
    m = Gemma(get_preset("tiny-gemma3"))
    m.init_weights(std=0.3, seed=0)
    return m.eval()


def _greedy_without_cache(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids


def test_greedy_matches_a_forward_loop_without_cache(model):
    prompt = [2, 17, 99, 310, 45]
    out = generate(model, IdTokenizer(), [prompt], max_new_tokens=20, stop_ids=())[0]
    assert out.prompt_ids == prompt
    assert prompt + out.ids == _greedy_without_cache(model, prompt, 20)
    assert out.finish_reason == "length" and len(out.ids) == 20


def test_batched_equals_one_at_a_time(model):
    prompts = ["17 99 310", "5 6 7 8 9 10 11 12 13 14 15", "400"]
    batched = generate(model, IdTokenizer(), prompts, max_new_tokens=12, stop_ids=())
    for prompt, out in zip(prompts, batched):
        alone = generate(model, IdTokenizer(), [prompt], max_new_tokens=12, stop_ids=())[0]
        assert out.ids == alone.ids
        assert out.text == " ".join(map(str, out.ids))


def test_stops_at_a_stop_token_without_returning_it(model):
    free = generate(model, IdTokenizer(), ["17 99"], max_new_tokens=10, stop_ids=())[0].ids
    stop = free[3]
    out = generate(model, IdTokenizer(), ["17 99"], max_new_tokens=10, stop_ids=(stop,))[0]
    assert out.ids == free[: free.index(stop)] and out.finish_reason == "stop"


def test_sampling_is_reproducible_with_a_seed(model):
    kw = dict(max_new_tokens=16, temperature=1.0, stop_ids=())
    a = generate(model, IdTokenizer(), ["17 99"], seed=1, **kw)[0].ids
    b = generate(model, IdTokenizer(), ["17 99"], seed=1, **kw)[0].ids
    c = generate(model, IdTokenizer(), ["17 99"], seed=2, **kw)[0].ids
    assert a == b and a != c


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    draw = lambda **kw: {sample_row(logits, SamplingParams(temperature=1.0, **kw), g) for _ in range(300)}  # noqa: E731
    assert draw(top_k=2) == {0, 1}
    # top-p 0.6: 0.5 does not reach 0.6, so the token that crosses it (0.3) stays, the rest go
    assert draw(top_p=0.6) == {0, 1}
    assert draw() == {0, 1, 2, 3}
    assert sample_row(logits, SamplingParams(temperature=0.0), None) == 0


def test_bad_arguments_are_clear_errors(model):
    with pytest.raises(GemmalabError, match="top_p"):
        generate(model, IdTokenizer(), ["1"], temperature=1.0, top_p=1.5)
    with pytest.raises(GemmalabError, match="exceeds this model's 256 positions"):
        generate(model, IdTokenizer(), ["1 " * 250], max_new_tokens=10)
