"""Weight-only int8/int4 quantization: modules against a dequantized matmul, whole models, errors, the real 270M."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gemmalab import GemmalabError, generate, save_hf
from gemmalab.model import Gemma, get_preset
from gemmalab.model.quant import (
    Int4Linear, Int8Linear, dequantize_int4, dequantize_int8, int4_inner_k_tiles, int4_shape_problem,
    pack_int4_nibbles, quantize, quantize_int4, quantize_int8,
)

DTYPES = [torch.float32, torch.bfloat16]
# bf16 outputs carry a relative rounding of up to 2**-9 per element; f32 outputs only summation-order noise.
MATMUL_TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3}
INT4_TOL = 4e-3  # the int4 kernels always take bf16 activations and return a bf16 product


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class IdTokenizer:
    """Test double: text is space-separated ids."""

    stop_ids = (1,)

    def encode(self, text, bos=True):
        return [2] * bos + [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


# Tiny Gemma 3 whose every in_features (dim, n_heads * head_dim, ffn_dim) is a multiple of 128.
CONFIG = dataclasses.replace(get_preset("tiny-gemma3"), dim=128, head_dim=32, ffn_dim=256)


def _model(config=CONFIG, dtype=torch.float32) -> Gemma:
    model = Gemma(config)
    model.init_weights(std=0.1, seed=0)
    return model.eval().to(dtype)


# ---- modules -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_module_matches_dequantized_matmul(dtype):
    torch.manual_seed(0)
    w = (torch.randn(96, 256) * 0.05).to(dtype)
    x = torch.randn(2, 20, 256).to(dtype)  # [B, T, K]
    module = Int8Linear(w)
    reference = dequantize_int8(module.weight, module.scales)
    assert module.weight.dtype == torch.int8 and module.scales.dtype == dtype
    assert _rel(reference, w) < 0.01  # the quantization error itself
    for rows in (x, x[:, :1]):  # 40 rows (dequantize and matmul) and 2 (the CPU kernel)
        y = module(rows)
        assert y.shape == (*rows.shape[:-1], 96) and y.dtype == dtype
        assert _rel(y, rows.float() @ reference.T) < MATMUL_TOL[dtype]


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_module_matches_dequantized_matmul(group_size, dtype):
    torch.manual_seed(0)
    w = (torch.randn(96, 256) * 0.05).to(dtype)
    x = torch.randn(2, 5, 256).to(dtype)
    module = Int4Linear(w, group_size)
    reference = dequantize_int4(*quantize_int4(w, group_size), group_size)  # the same deterministic math
    assert _rel(reference, w) < 0.12  # 4-bit groups of Gaussian weights: about 0.08 (32) to 0.10 (128)
    y = module(x)
    assert y.shape == (2, 5, 96) and y.dtype == dtype
    assert _rel(y, x.to(torch.bfloat16).float() @ reference.T) < INT4_TOL
    assert _rel(y, x.float() @ reference.T) < INT4_TOL


def test_int4_math_is_exact_on_a_4bit_grid():
    """A weight already on a per-group 4-bit grid (bf16-exact step and offset) comes back exactly."""
    torch.manual_seed(0)
    N, K, g = 32, 128, 64
    codes = torch.randint(0, 16, (N, K))
    codes[:, ::g], codes[:, 1::g] = 0, 15  # every group spans the full range
    step = 2.0 ** torch.randint(-8, -4, (N, K // g, 1)).float()
    offset = torch.randint(-64, 64, (N, K // g, 1)).float() / 256
    w = (codes.reshape(N, K // g, g) * step + offset).reshape(N, K)
    q, scales_and_zeros = quantize_int4(w, g)
    assert q.dtype == torch.int32 and int(q.min()) >= 0 and int(q.max()) <= 15
    assert scales_and_zeros.shape == (K // g, N, 2) and scales_and_zeros.dtype == torch.bfloat16
    torch.testing.assert_close(dequantize_int4(q, scales_and_zeros, g), w, rtol=0, atol=0)
    torch.testing.assert_close(Int4Linear(w, g)(torch.eye(K)).T.float(), w, rtol=0, atol=0)


def test_int8_math_rounds_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    q, scales = quantize_int8(w)
    assert int(q.abs().max()) == 127
    assert float((dequantize_int8(q, scales) - w).abs().div(scales[:, None]).max()) <= 0.5 + 1e-4


def test_cuda_int4_layout_helpers():
    """The CUDA path's pure-torch parts: nibble packing (even k high) and the shape rules."""
    q = torch.randint(0, 16, (8, 64), dtype=torch.int32)
    packed = pack_int4_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 32)
    assert torch.equal((packed >> 4).int(), q[:, ::2]) and torch.equal((packed & 15).int(), q[:, 1::2])
    assert [int4_inner_k_tiles(k) for k in (640, 2048, 64, 96, 48)] == [8, 8, 4, 2, 0]
    assert int4_shape_problem(24, 256, 128, "cuda") is None  # CUDA tiles are 8 rows, CPU tiles 16
    assert "multiple of 16" in int4_shape_problem(24, 256, 128, "cpu")
    assert "multiple of 8" in int4_shape_problem(12, 256, 128, "cuda")
    assert "CPU and CUDA only" in int4_shape_problem(16, 256, 128, "meta")


def test_int4_module_refuses_another_device():
    module = Int4Linear(torch.randn(16, 64), 32)
    module.device_type = "cuda"  # as if packed on a GPU and then moved
    with pytest.raises(GemmalabError, match="packed for cuda"):
        module(torch.randn(1, 64))


# ---- whole model ------------------------------------------------------------------------------------------------

# Relative error of the logits of a random 6-layer model (which amplifies weight noise), measured over seeds
# 0-2: int8 0.021-0.024; int4 0.24-0.28 (group 32), 0.28-0.34 (64), 0.31-0.38 (128).
MODEL_CASES = [("int8", 128, 0.04), ("int4", 32, 0.4), ("int4", 64, 0.45), ("int4", 128, 0.5)]


@pytest.mark.parametrize("mode,group_size,bound", MODEL_CASES)
def test_quantized_tiny_model_logits_close(mode, group_size, bound):
    model = _model()
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(tokens)
        embed = model.embed.weight.clone()
        quantize(model, mode, group_size)
        logits = model(tokens)
    kind = Int8Linear if mode == "int8" else Int4Linear
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, kind) and isinstance(model.layers[0].mlp.down, kind)
    assert torch.equal(model.embed.weight, embed)  # the lookup keeps its full-precision table
    assert logits.dtype == torch.float32
    assert _rel(logits, reference) < bound


@pytest.mark.parametrize("mode,bound", [("int8", 0.05), ("int4", 0.55)])  # measured: 0.029, 0.354
def test_quantized_bf16_model(mode, bound):
    model = _model(dtype=torch.bfloat16)
    tokens = torch.randint(0, CONFIG.vocab_size, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(tokens)
        logits = quantize(model, mode)(tokens)
    assert logits.dtype == torch.bfloat16
    assert _rel(logits, reference) < bound


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_generation_is_deterministic(mode):
    model = quantize(_model(), mode)
    prompts = ["5 17 99 310", "7 7"]  # a left-padded batch of two
    first = generate(model, IdTokenizer(), prompts, max_new_tokens=12, stop_ids=())
    second = generate(model, IdTokenizer(), prompts, max_new_tokens=12, stop_ids=())
    assert [g.ids for g in first] == [g.ids for g in second]
    assert all(len(g.ids) == 12 for g in first)


def test_unknown_mode_and_requantizing_are_refused():
    model = _model()
    with pytest.raises(GemmalabError, match="Unknown quantization mode 'int3'"):
        quantize(model, "int3")
    quantize(model, "int8")
    with pytest.raises(GemmalabError, match="already quantized"):
        quantize(model, "int4")


def test_int4_shape_errors_name_the_layer_and_leave_the_model_alone():
    model = _model(get_preset("tiny-gemma3"))  # dim 64: not a multiple of 128
    with pytest.raises(GemmalabError, match=r"layers\.0\.attn\.q \[64, 64\].*in_features 64 is not a multiple of group_size 128"):
        quantize(model, "int4", group_size=128)
    assert model.lm_head is None and isinstance(model.layers[0].attn.q, nn.Linear)
    with pytest.raises(GemmalabError, match="group_size must be one of"):
        quantize(model, "int4", group_size=16)
    quantize(model, "int4", group_size=64)  # but 64 fits every layer
    assert isinstance(model.lm_head, Int4Linear)


def test_save_hf_refuses_a_quantized_model(tmp_path):
    model = quantize(_model(), "int8")
    with pytest.raises(GemmalabError, match="quantized"):
        save_hf(model, tmp_path / "out")


# ---- the real Gemma 3 270M ------------------------------------------------------------------------------------

PROSE = (
    "The printing press is a device for applying pressure to an inked surface resting upon a print medium, "
    "such as paper or cloth, thereby transferring the ink. It marked a dramatic improvement on earlier printing "
    "methods in which the cloth, paper or other medium was brushed or rubbed repeatedly to achieve the transfer "
    "of ink, and it accelerated the process. Typically used for texts, the invention and global spread of the "
    "printing press was one of the most influential events of the second millennium. In Germany, around 1440, "
    "the goldsmith Johannes Gutenberg invented the movable-type printing press, which started the Printing "
    "Revolution. Modelled on the design of existing screw presses, a single Renaissance movable-type printing "
    "press could produce up to 3,600 pages per workday, compared to forty by hand-printing."
)


def _perplexity(model, ids: list[int]) -> float:
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logits = model(tokens[:, :-1])[0].float()
    return math.exp(float(F.cross_entropy(logits, tokens[0, 1:])))


@pytest.mark.real_model
def test_real_model_int8_keeps_the_greedy_continuation(real_model):
    model, tokenizer = real_model
    quantized = quantize(copy.deepcopy(model), "int8")  # never touch the shared session model
    prompt = "The capital of France is"
    want = generate(model, tokenizer, [prompt], max_new_tokens=8, stop_ids=())[0].ids
    got = generate(quantized, tokenizer, [prompt], max_new_tokens=8, stop_ids=())[0].ids
    assert got == want, (tokenizer.decode(got), tokenizer.decode(want))
    ids = tokenizer.encode(PROSE)
    assert _perplexity(quantized, ids) < 1.03 * _perplexity(model, ids)  # measured: 19.95 vs 19.99


@pytest.mark.real_model
def test_real_model_int4_perplexity_bound(real_model):
    model, tokenizer = real_model
    quantized = quantize(copy.deepcopy(model), "int4", group_size=128)
    ids = tokenizer.encode(PROSE)
    base, q4 = _perplexity(model, ids), _perplexity(quantized, ids)
    # Gemma 3 270M is fragile at 4 bits (round-to-nearest, group 128); measured: fp32 20.0 -> int4 28.7 (1.43x).
    assert q4 < 2.0 * base, (base, q4)
    text = generate(quantized, tokenizer, ["The capital of France is"], max_new_tokens=8, stop_ids=())[0].text
    assert text.strip()


# Measured: int8 1e-6 (f32 throughout); int4 0.0075 (the int4 matmuls round activations to bf16).
@pytest.mark.parametrize("mode,group_size,bound", [("int8", 128, 1e-5), ("int4", 32, 0.02), ("int4", 128, 0.02)])
def test_quantized_model_equals_its_dequantized_weights(mode, group_size, bound):
    """Wiring: the quantized model computes what the unquantized one does with dequantized weights."""
    model = _model()
    fake = copy.deepcopy(model)
    quantize(model, mode, group_size)

    def dequantized(w):
        if mode == "int8":
            return dequantize_int8(*quantize_int8(w))
        return dequantize_int4(*quantize_int4(w, group_size), group_size)

    with torch.no_grad():
        for m in fake.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(dequantized(m.weight))
        fake.lm_head = nn.Linear(CONFIG.dim, CONFIG.vocab_size, bias=False)
        fake.lm_head.weight.copy_(dequantized(fake.embed.weight))
        tokens = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        assert _rel(model(tokens), fake(tokens)) < bound
