"""Parity with transformers on random weights: Gemma, Gemma2, Gemma3-text; and checkpoint round trips."""

import json

import pytest
import torch
import transformers

from gemmalab.checkpoint.hf import load_hf, save_hf
from gemmalab.model import Gemma, get_preset

FAMILIES = ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"]


def _batch(vocab: int, seed: int = 0):
    """Two rows of different lengths (13 and 20), right-padded, with their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (2, 20), generator=g)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, 13:] = 0
    ids[0, 13:] = 0
    return ids, mask


def _random_model(preset: str, seed: int = 0) -> Gemma:
    model = Gemma(get_preset(preset))
    model.init_weights(std=0.2, seed=seed)
    with torch.no_grad():  # non-zero norm weights, so a missing (1 + w) or a swapped norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    return model.eval()


def _max_diff_on_real(a, b, mask):
    keep = mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


@pytest.mark.parametrize("preset", FAMILIES)
def test_logits_match_transformers(preset, tmp_path):
    model = _random_model(preset)
    save_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32, attn_implementation="eager").eval()
    ids, mask = _batch(model.config.vocab_size)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert ours.shape == theirs.shape
    diff = _max_diff_on_real(ours, theirs, mask)
    assert diff <= 1e-4, f"{preset}: max |logit diff| {diff:.2e}"
    # The test can fail: a real change of numerics (exact instead of tanh GELU) is far outside the bound.
    assert ours.abs().max() > 1.0


@pytest.mark.parametrize("preset", FAMILIES)
def test_transformers_checkpoint_loads_in_gemmalab(preset, tmp_path):
    model = _random_model(preset, seed=1)
    save_hf(model, tmp_path / "ours")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", torch_dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "theirs")
    loaded = load_hf(tmp_path / "theirs")
    ids, mask = _batch(model.config.vocab_size, seed=2)
    with torch.no_grad():
        diff = _max_diff_on_real(loaded(ids, attention_mask=mask), hf(input_ids=ids, attention_mask=mask).logits, mask)
    assert diff <= 1e-4
    assert loaded.config == model.config


def test_sharded_save_round_trips(tmp_path):
    model = _random_model("tiny-gemma3", seed=3)
    save_hf(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_hf(tmp_path)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
