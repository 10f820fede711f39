"""Optimizer groups and schedules; FLOPs, MFU, carbon arithmetic; the metrics logger's files."""

import json
import math

import pytest
import torch

from gemmalab.errors import GemmalabError
from gemmalab.model.config import get_preset
from gemmalab.model.gemma import Gemma
from gemmalab.train.metrics import (
    CarbonConfig, carbon, flops_per_token, memory_stats, mfu, peak_flops, _match_gpu,
)
from gemmalab.runs import MetricsLogger
from gemmalab.train.optim import OptimConfig, build_optimizer, build_scheduler, lr_at


def test_warmup_then_cosine_to_min_ratio():
    cfg = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(4, cfg) == pytest.approx(0.5)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half-way: floor + (1 - floor) / 2
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_wsd_plateau_then_linear_decay():
    cfg = OptimConfig(lr=2.0, schedule="wsd", warmup_steps=5, total_steps=100, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_at(2, cfg) == pytest.approx(1.2)
    assert all(lr_at(s, cfg) == 2.0 for s in range(5, 81))  # stable until the last 20 steps
    assert lr_at(90, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.0)
    const = OptimConfig(lr=1.0, schedule="constant", warmup_steps=2, total_steps=10)
    assert [lr_at(s, const) for s in (0, 1, 2, 9, 50)] == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_scheduler_follows_lr_at_and_config_errors():
    model = Gemma(get_preset("tiny-gemma"))
    cfg = OptimConfig(lr=0.01, warmup_steps=3, total_steps=20)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    seen = []
    for step in range(25):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, cfg) for s in range(25)])
    with pytest.raises(GemmalabError, match="schedule"):
        OptimConfig(schedule="linear")
    with pytest.raises(GemmalabError, match="exceed"):
        OptimConfig(schedule="wsd", warmup_steps=90, total_steps=100, decay_fraction=0.2)


def test_param_groups_norms_not_decayed_and_fused():
    model = Gemma(get_preset("tiny-gemma2"))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, _ in model.named_parameters() if n.endswith("norm.weight")}
    assert any(names[id(p)] == "embed.weight" for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["fused"] is True  # this torch has a fused CPU AdamW


def test_flops_per_token_gemma_2b_by_hand():
    c = get_preset("gemma-2b")
    # Parameters by hand: embedding once (tied) + 18 layers of q, k, v, o, GeGLU and 2 norms + final norm.
    d, v, L, H, kv, hd, f = 2048, 256_000, 18, 8, 1, 256, 16_384
    per_layer = d * H * hd * 2 + d * kv * hd * 2 + 3 * d * f + 2 * d
    n = v * d + L * per_layer + d
    assert n == 2_506_172_416
    expected = 6 * n + 12 * L * H * hd * 8192
    assert flops_per_token(c, 8192) == expected
    assert flops_per_token(c, 8192) / 1e9 == pytest.approx(18.66, abs=0.01)  # the fact sheet's figure
    assert flops_per_token(c, 2048) / 1e9 == pytest.approx(15.94, abs=0.01)
    assert mfu(21_200, expected, 989e12) == pytest.approx(0.40, abs=0.001)


def test_peak_flops_table_and_cpu_measurement():
    assert _match_gpu("NVIDIA H100 80GB HBM3") == 989e12
    assert _match_gpu("NVIDIA H100 PCIe") == 756e12
    assert _match_gpu("NVIDIA H200") == 989e12
    assert _match_gpu("NVIDIA A100-SXM4-80GB") == 312e12
    assert _match_gpu("NVIDIA A10G") is None and _match_gpu("NVIDIA A10") == 125e12
    assert _match_gpu("NVIDIA L4") == 121e12 and _match_gpu("NVIDIA L40S") == 362e12
    assert peak_flops("cpu", override=1e12) == 1e12
    measured = peak_flops("cpu", torch.float32)
    assert measured > 0 and peak_flops("cpu", torch.float32) == measured  # cached
    assert memory_stats("cpu")["mem_peak_rss_gb"] > 0


def test_carbon_arithmetic():
    cfg = CarbonConfig(device_power_watts=700, num_devices=8, pue=1.1, grid_kg_co2e_per_kwh=0.4)
    row = carbon(3600 * 10, cfg)  # 10 hours
    assert row["energy_kwh"] == pytest.approx(0.7 * 8 * 10 * 1.1)  # 61.6 kWh
    assert row["co2e_kg"] == pytest.approx(61.6 * 0.4)
    assert row["device_hours"] == 80 and row["pue"] == 1.1
    with pytest.raises(GemmalabError, match="pue"):
        CarbonConfig(pue=0.9)


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path / "run") as log:
        log.log(1, {"loss": torch.tensor(2.5), "lr": 1e-3, "grad_norm": float("nan"), "phase": "pretrain"})
        log.log(2, {"loss": 2.25, "lr": 2e-3, "tokens_per_s": 1000})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": None, "phase": "pretrain"}
    assert rows[1]["step"] == 2 and math.isclose(rows[1]["loss"], 2.25)
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    with pytest.raises(GemmalabError, match="close"):
        log.log(3, {"loss": 1.0})
