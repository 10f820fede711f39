"""bench/train_mfu.py's logic on CPU with a tiny preset (its real use is gemma-2b on a GPU, which CI lacks): the real
trainer under torchrun with one process, figures read back from its metrics."""

import importlib.util
from pathlib import Path

import pytest


def _bench():
    path = Path(__file__).resolve().parent.parent / "bench" / "train_mfu.py"
    spec = importlib.util.spec_from_file_location("train_mfu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_figures_come_from_the_timed_steps_of_a_one_process_torchrun(tmp_path):
    from gemmalab.model import get_preset
    from gemmalab.train.metrics import flops_per_token

    # A fixed peak: MFU is then a function of the logged tokens/s alone, whatever the machine's load.
    peak = 1e12
    r = _bench().measure("tiny-gemma", seq=32, batch=2, steps=4, warmup=1, compile=False, device="cpu",
                         workdir=tmp_path, peak_flops=peak)
    assert r["world_size"] == 1 and r["device"] == "cpu" and r["steps_timed"] == 3
    # tokens/s is the tokens of one step over its time, as the trainer logged it
    assert r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_time_s"], rel=1e-6)
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops_per_token(get_preset("tiny-gemma"), 32) / peak, rel=1e-6)
    assert r["final_loss"] > 0
    assert list(tmp_path.iterdir()) == []  # shards, config and run directory were temporary


def test_a_measured_cpu_peak_is_never_below_the_rate_achieved():
    """A busy moment can make the CPU's measured matmul peak come out low; MFU against it is capped at 1."""
    from gemmalab.train.metrics import mfu

    assert mfu(1000.0, 1e6, peak=5e8, measured=True) == 1.0  # achieved 1e9 FLOP/s > the measured 5e8
    assert mfu(1000.0, 1e6, peak=2e9, measured=True) == 0.5
    assert mfu(1000.0, 1e6, peak=5e8) == 2.0  # a spec-sheet peak is taken as given


def test_random_shards_hold_the_requested_tokens(tmp_path):
    from gemmalab.data.packing import read_meta

    _bench().write_random_shards(tmp_path / "s", vocab_size=100, tokens=1000, seq_len=16)
    meta = read_meta(tmp_path / "s")
    assert meta.num_tokens >= 1000 and meta.vocab_size == 100 and meta.source_names == ["random"]


def test_config_text_is_a_valid_train_config(tmp_path):
    import torch

    from gemmalab.config import load
    from gemmalab.train.pretrain import PretrainConfig

    path = tmp_path / "t.toml"
    path.write_text(_bench().config_text("gemma-2b", tmp_path / "s", seq=2048, batch=2, steps=12, compile=True,
                                         checkpointing=False, device="cuda", loss_chunk_mb=4096, peak_flops=9.89e14))
    cfg = load(PretrainConfig, path)
    assert (cfg.train.loss_chunk_mb, cfg.train.compile, cfg.train.dtype, cfg.data.seq_len) == (4096, True, torch.bfloat16, 2048)
    assert cfg.train.peak_flops == 9.89e14
    assert not cfg.checkpoint.at_end and not cfg.checkpoint.export
