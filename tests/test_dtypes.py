"""dtype `auto`: the choice with the CPU probe faked both ways, and every entry point honouring it (gemmalab.load,
the command line, configs)."""

from __future__ import annotations

import logging

import pytest
import torch

from gemmalab import dtypes
from gemmalab.errors import GemmalabError


@pytest.fixture
def probe(monkeypatch):
    """Set what the probe sees: flags and the two timings; the cached answer is cleared before and after."""
    dtypes._cpu_bf16_probe.cache_clear()
    monkeypatch.delenv("GEMMALAB_CPU_BF16", raising=False)

    def fake(flags: set[str], bf16_s: float = 1.0, fp32_s: float = 1.0):
        dtypes._cpu_bf16_probe.cache_clear()
        monkeypatch.setattr(dtypes, "cpu_flags", lambda: flags)
        monkeypatch.setattr(dtypes, "_matmul_seconds", lambda dt, *a, **k: bf16_s if dt == torch.bfloat16 else fp32_s)

    yield fake
    dtypes._cpu_bf16_probe.cache_clear()


def test_the_choice(probe, monkeypatch):
    probe({"avx2", "fma"}, bf16_s=0.001, fp32_s=1.0)  # no native bf16: the timing is not even asked
    assert dtypes.parse_dtype("auto", "cpu") == torch.float32 and not dtypes.cpu_bf16_fast()
    probe({"avx2", "avx512_bf16", "amx_bf16"}, bf16_s=0.2, fp32_s=0.7)  # native and faster
    assert dtypes.parse_dtype("AUTO", "cpu") == torch.bfloat16
    probe({"avx512_bf16"}, bf16_s=3.0, fp32_s=1.0)  # the flag, but slow in practice
    assert dtypes.parse_dtype("auto", "cpu") == torch.float32
    assert dtypes.parse_dtype("auto", "cuda") == torch.bfloat16  # CUDA keeps bf16, whatever the CPU
    monkeypatch.setenv("GEMMALAB_CPU_BF16", "1")
    dtypes._cpu_bf16_probe.cache_clear()
    assert dtypes.parse_dtype("auto", "cpu") == torch.bfloat16  # the override wins
    assert dtypes.parse_dtype("bf16") == torch.bfloat16 and dtypes.parse_dtype(torch.float16) == torch.float16
    with pytest.raises(GemmalabError, match="auto"):
        dtypes.parse_dtype("fp8")


def test_the_real_probe_answers_without_error(monkeypatch):
    """On this machine, whatever it is: a boolean, consistent with its flags."""
    monkeypatch.delenv("GEMMALAB_CPU_BF16", raising=False)
    dtypes._cpu_bf16_probe.cache_clear()
    fast = dtypes.cpu_bf16_fast()
    dtypes._cpu_bf16_probe.cache_clear()
    assert isinstance(fast, bool)
    if not dtypes.cpu_flags() & dtypes.NATIVE_BF16_FLAGS:
        assert fast is False


@pytest.mark.parametrize("native", [False, True])
def test_entry_points_honour_auto(native, probe, tiny_tokenizer, tmp_path, caplog):
    import gemmalab
    from gemmalab.checkpoint import save_hf
    from gemmalab.cli.common import dtype_arg
    from gemmalab.config import load
    from gemmalab.model import Gemma, get_preset
    from gemmalab.train.sft import SFTConfig

    probe({"avx512_bf16"} if native else {"avx2"}, bf16_s=0.1, fp32_s=1.0)
    want = torch.bfloat16 if native else torch.float32
    model = Gemma(get_preset("tiny-gemma"))
    model.init_weights(seed=0)
    ref = save_hf(model, tmp_path / "m", tiny_tokenizer)
    loaded, _ = gemmalab.load(ref, dtype="auto")
    assert loaded.embed.weight.dtype == want
    assert gemmalab.load(ref)[0].embed.weight.dtype == want  # auto is the Python API's default
    assert dtype_arg("auto") == want  # every --dtype flag
    from gemmalab.cli import build_parser

    for argv in (["generate", "--model", "m", "--prompt", "x"], ["chat", "--model", "m"], ["serve", "--model", "m"],
                 ["eval", "--model", "m", "--tasks", "checkable"], ["sxs", "--model", "m", "--baseline", "b", "--judge", "j"],
                 ["memorization", "--model", "m", "--corpus", "c"]):
        args = build_parser().parse_args(argv)
        assert args.dtype == want, argv  # auto is the inference commands' default
    cfg = load(SFTConfig, None, [f'model.init_from="{ref}"', 'train.dtype="auto"'])
    assert cfg.train.dtype == want
    assert load(SFTConfig, None, [f'model.init_from="{ref}"']).train.dtype == want  # and training's default
    assert load(SFTConfig, None, [f'model.init_from="{ref}"', 'train.dtype="fp32"']).train.dtype == torch.float32
    with caplog.at_level(logging.WARNING, logger="gemmalab.checkpoint"):
        gemmalab.load(ref, dtype="bf16")  # explicit: honoured, with a warning where it is the slow one
    assert any("100x slower" in r.message for r in caplog.records) == (not native)
