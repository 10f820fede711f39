"""The model itself: parameter counts, numerics that other implementations got wrong, cache and padding."""

import math

import pytest
import torch

from gemmalab import GemmalabError
from gemmalab.model import PRESETS, Gemma, KVCache, ModelConfig, get_preset
from gemmalab.model.layers import RMSNorm, apply_rope, rope_angles


def test_published_parameter_counts():
    assert get_preset("gemma-2b").num_params() == 2_506_172_416
    assert get_preset("gemma-7b").num_params() == 8_537_680_896
    assert get_preset("gemma2-2b").num_params() == 2_614_341_888
    assert get_preset("gemma3-270m").num_params() == 268_098_176


@pytest.mark.parametrize("name", list(PRESETS))
def test_instantiated_model_has_the_counted_parameters(name):
    with torch.device("meta"):
        model = Gemma(get_preset(name))
    assert sum(p.numel() for p in model.parameters()) == get_preset(name).num_params()


def test_attention_kinds_follow_kv_heads():
    assert get_preset("gemma-2b").n_kv_heads == 1  # multi-query
    assert get_preset("gemma-7b").n_kv_heads == get_preset("gemma-7b").n_heads  # multi-head
    with torch.device("meta"):
        attn = Gemma(get_preset("gemma-7b")).layers[0].attn
    assert attn.q.weight.shape == (4096, 3072) and attn.o.weight.shape == (3072, 4096)


def test_layer_patterns():
    g2, g3 = get_preset("gemma2-2b"), get_preset("gemma3-270m")
    assert [g2.is_local(i) for i in range(4)] == [True, False, True, False]
    assert [g3.is_local(i) for i in range(12)] == [True] * 5 + [False] + [True] * 5 + [False]
    assert not any(get_preset("gemma-2b").is_local(i) for i in range(18))
    assert get_preset("gemma2-27b").attn_scale == 144**-0.5
    assert get_preset("gemma-7b").attn_scale == 1 / 16


def test_config_rejects_unknown_and_inconsistent_fields():
    with pytest.raises(GemmalabError, match="unknown model config field.*n_layer"):
        ModelConfig.from_dict({"n_layer": 2})
    with pytest.raises(GemmalabError, match="multiple of n_kv_heads"):
        ModelConfig(n_heads=8, n_kv_heads=3)
    with pytest.raises(GemmalabError, match="sliding_window is not"):
        ModelConfig(sliding_pattern=2)
    with pytest.raises(GemmalabError, match="family"):
        ModelConfig(family="llama")


def test_rmsnorm_scales_by_one_plus_weight_in_f32():
    norm = RMSNorm(4)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    expected = x / torch.sqrt((x**2).mean() + 1e-6)
    torch.testing.assert_close(norm(x), expected)
    with torch.no_grad():
        norm.weight.fill_(0.5)
    torch.testing.assert_close(norm(x), expected * 1.5)
    assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_rope_is_half_split_and_keeps_norms():
    x = torch.randn(1, 1, 3, 8)
    cos, sin = rope_angles(torch.arange(3)[None], 8, 10_000.0)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])  # position 0: no rotation
    # pair (i, i + hd/2) rotates together, so the norm of each pair is kept
    pair_norm = lambda t: t[..., :4] ** 2 + t[..., 4:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(y), pair_norm(x))
    angle = 2 * 1.0  # position 2, frequency index 0
    torch.testing.assert_close(y[0, 0, 2, 0], x[0, 0, 2, 0] * math.cos(angle) - x[0, 0, 2, 4] * math.sin(angle))


def test_embedding_scale_is_rounded_to_activation_dtype():
    config = ModelConfig(vocab_size=8, dim=3072, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=16, ffn_dim=8)
    model = Gemma(config).to(torch.bfloat16)
    seen = {}
    model.layers[0].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    tokens = torch.tensor([[1, 2]])
    model(tokens)
    assert torch.tensor(math.sqrt(3072), dtype=torch.bfloat16).item() == 55.5
    torch.testing.assert_close(seen["x"], model.embed(tokens) * torch.tensor(55.5, dtype=torch.bfloat16), rtol=0, atol=0)


def _model(preset, seed=0):
    model = Gemma(get_preset(preset))
    model.init_weights(std=0.2, seed=seed)
    return model.eval()


@pytest.mark.parametrize("preset", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"])
def test_kv_cache_decoding_matches_full_forward_past_the_window(preset):
    model = _model(preset)
    tokens = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(0))  # window is 8
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.config, 2, 30)
        steps = [model(tokens[:, :10], cache=cache)]
        steps += [model(tokens[:, t:t + 1], cache=cache) for t in range(10, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 6, 11])
def test_sliding_layers_keep_only_their_window_and_chunks_match_full_forward(chunk):
    model = _model("tiny-gemma3")  # window 8, layers 0, 1, 3, 4 local
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.config, 2, 40)
    assert [k.shape[2] for k in cache.k] == [8, 8, 40, 8, 8, 40]
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, t:t + chunk], cache=cache) for t in range(0, 33, chunk)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-gemma2", "tiny-gemma3"])
def test_left_padded_row_equals_unpadded_row(preset):
    model = _model(preset)
    row = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), row], 1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 12)], 1).bool()
    with torch.no_grad():
        alone = model(row)
        batched = model(padded, attention_mask=mask)
    torch.testing.assert_close(batched[:, 5:], alone, rtol=1e-5, atol=1e-5)


def test_positions_beyond_the_maximum_are_a_clear_error():
    model = _model("tiny-gemma")
    with pytest.raises(GemmalabError, match="beyond this model's maximum of 256"):
        model(torch.zeros(1, 257, dtype=torch.long))
    model(torch.zeros(1, 256, dtype=torch.long))  # the last valid position works


def test_softcapping_bounds_the_logits():
    model = _model("tiny-gemma2")
    with torch.no_grad():
        model.embed.weight.mul_(100)
        logits = model(torch.randint(0, 512, (1, 8)))
    assert logits.abs().max() <= 30.0


@pytest.mark.parametrize("preset", ["tiny-gemma", "tiny-gemma2", "tiny-gemma3"])
def test_packed_documents_do_not_see_each_other(preset):
    model = _model(preset)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 512, (1, 7), generator=g), torch.randint(0, 512, (1, 12), generator=g)
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(7), torch.arange(12)])[None]
    doc_ids = torch.tensor([[0] * 7 + [1] * 12])
    with torch.no_grad():
        out = model(packed, positions=positions, doc_ids=doc_ids)
        torch.testing.assert_close(out[:, :7], model(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, 7:], model(b), rtol=1e-5, atol=1e-5)


def test_hidden_states_times_the_embedding_are_the_logits():
    model = _model("tiny-gemma2")  # with the final soft-cap
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = model(tokens, return_hidden=True)
        logits = torch.tanh(hidden @ model.embed.weight.T / 30.0) * 30.0
        torch.testing.assert_close(logits, model(tokens), rtol=1e-5, atol=1e-5)


def test_a_config_with_absurdly_many_layers_is_refused_before_anything_is_built():
    from gemmalab.errors import GemmalabError
    from gemmalab.model.config import MAX_LAYERS, ModelConfig

    with pytest.raises(GemmalabError, match=f"n_layers must be at most {MAX_LAYERS}"):
        ModelConfig(n_layers=10**9)  # a broken config.json: Gemma(cfg) on meta would hang (pretrain --dry-run)
