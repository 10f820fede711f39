"""Pretraining on the shared loop: loss falls, checkpoint integrity and resume, NaN steps, dry run. (SIGKILL and
SIGTERM with exact resume: tests/test_pretrain_recorded.py.)

Everything runs on a tiny model (tiny-gemma, vocab 512) over token shards packed here from generated text,
so it needs nothing from runs/ and takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from gemmalab.config import load, to_toml
from gemmalab.errors import GemmalabError
from gemmalab.train.checkpoint import MARKER, complete_checkpoints, latest_complete
from gemmalab.train.pretrain import PretrainConfig, dry_run, pretrain

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tiny_tokenizer, tmp_path_factory) -> Path:
    """Token shards of a slice of the built-in corpus (stdlib prose and code, generated math)."""
    from gemmalab.data.corpus import write_builtin_corpus
    from gemmalab.data.packing import pack

    root = tmp_path_factory.mktemp("train_data")
    files = write_builtin_corpus(root / "docs", max_files=12, math_problems=300)
    pack(files, tiny_tokenizer, root / "tokens", seq_len=32, progress=False)
    return root / "tokens"


def _config_file(tmp: Path, shards: Path, tokenizer_path: Path | None = None, **extra: str) -> Path:
    """A tiny TOML config; `extra` entries are `section = "toml lines"` appended to those sections."""
    text = f"""
[model]
preset = "tiny-gemma"

[data]
shards = ["{shards}"]
batch_size = 4
seq_len = 32
seed = 1
{f'tokenizer = "{tokenizer_path}"' if tokenizer_path else ''}

[optim]
lr = 0.003
warmup_steps = 3

[train]
steps = 12
log_every = 1
seed = 3
{extra.get('train', '')}

[checkpoint]
every = 3
keep = 2
"""
    path = tmp / "train.toml"
    path.write_text(text)
    return path


def _losses(run: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl (logged steps with a loss)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec and "skipped" not in rec:
            out[rec["step"]] = rec["loss"]
    return out


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_run_directory(shards, tiny_tokenizer, tmp_path):
    tok_file = tmp_path / "tok" / "tokenizer.model"
    tiny_tokenizer.save(tok_file.parent)
    cfg = load(PretrainConfig, _config_file(tmp_path, shards, tok_file), ["train.steps=40", "checkpoint.every=20"])
    out = tmp_path / "run"
    result = pretrain(cfg, out, progress=False)
    losses = [v for _, v in sorted(_losses(out).items())]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)
    # The run directory contract.
    assert result["status"] == "finished" and result["steps"] == 40 and result["tokens"] == 40 * 4 * 32
    saved = json.loads((out / "result.json").read_text())
    assert saved["final_loss"] == losses[-1] and "carbon" in saved
    assert load(PretrainConfig, out / "config.toml") == cfg
    assert [s for s, _ in complete_checkpoints(out / "checkpoints")] == [20, 40]
    rec = _records(out)[-1]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_peak_rss_gb"):
        assert key in rec
    from gemmalab.checkpoint.hf import load_hf

    model = load_hf(out / "model")
    assert (out / "model" / "tokenizer.model").is_file()
    with torch.no_grad():
        assert model(torch.tensor([[2, 5, 7]])).shape == (1, 3, 512)


def test_no_final_checkpoint_or_export_when_turned_off(shards, tmp_path):
    """checkpoint.at_end / export off (benchmarks): the run trains and logs, and writes neither."""
    cfg = load(PretrainConfig, _config_file(tmp_path, shards), ["train.steps=4", "checkpoint.every=0", "checkpoint.at_end=false",
                                                      "checkpoint.export=false"])
    result = pretrain(cfg, tmp_path / "run", progress=False)
    assert result["status"] == "finished" and len(_losses(tmp_path / "run")) == 4 and "model_dir" not in result
    assert complete_checkpoints(tmp_path / "run" / "checkpoints") == []
    assert not (tmp_path / "run" / "model").exists()


def test_incomplete_checkpoint_is_ignored(shards, tmp_path):
    cfg = load(PretrainConfig, _config_file(tmp_path, shards))
    out = tmp_path / "run"
    pretrain(cfg, out, progress=False)
    expected = _losses(out)
    ckpts = out / "checkpoints"
    assert [s for s, _ in complete_checkpoints(ckpts)] == [9, 12]  # keep = 2
    # A write cut short: a file of the newest checkpoint missing -> the previous one is used.
    newest = ckpts / "step-0000012"
    next(newest.glob("*.distcp")).unlink()
    assert latest_complete(ckpts).name == "step-0000009"
    # A directory without the marker and a leftover .tmp directory, both newer: ignored as well.
    shutil.copytree(ckpts / "step-0000009", ckpts / "step-0000015.tmp")
    shutil.copytree(ckpts / "step-0000009", ckpts / "step-0000014")
    (ckpts / "step-0000014" / MARKER).unlink()
    assert latest_complete(ckpts).name == "step-0000009"
    # Resuming uses step 9 and reproduces steps 10-12 exactly.
    result = pretrain(cfg, out, resume=True, progress=False)
    assert result["steps"] == 12
    assert _losses(out) == expected
    with pytest.raises(GemmalabError, match="--resume"):
        pretrain(cfg, out, progress=False)  # an existing run is not silently overwritten


def test_nan_step_is_skipped_and_logged(shards, tmp_path):
    cfg = load(PretrainConfig, _config_file(tmp_path, shards), ["train.steps=6", "debug.nan_steps=[3]", "checkpoint.every=0"])
    result = pretrain(cfg, tmp_path / "run", progress=False)
    assert result["status"] == "finished" and result["steps"] == 6
    records = {r["step"]: r for r in _records(tmp_path / "run")}
    assert records[3]["skipped"] == "non-finite loss"
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == [1, 2, 4, 5, 6] and all(v == v and abs(v) < 100 for v in losses.values())

    cfg = load(PretrainConfig, _config_file(tmp_path, shards),
                      ["train.steps=6", "debug.nan_steps=[2,3,4]", "train.max_bad_steps=3", "checkpoint.every=0"])
    with pytest.raises(GemmalabError, match="3 non-finite steps in a row"):
        pretrain(cfg, tmp_path / "run2", progress=False)
    assert [r["step"] for r in _records(tmp_path / "run2") if "skipped" in r] == [2, 3, 4]


@pytest.mark.parametrize("name,params", [("gemma-2b", 2_506_172_416), ("gemma-7b", 8_537_680_896)])
def test_dry_run_full_scale(name, params):
    cfg = load(PretrainConfig, ROOT / "configs" / "train" / f"{name}.toml")
    buf = io.StringIO()
    plan = dry_run(cfg, world_size=8, file=buf)
    text = buf.getvalue()
    assert plan["parameters"] == params == plan["parameters_formula"]
    assert f"{params:,} parameters" in text
    assert plan["seq_len"] == 8192 and plan["dtype"] == "bf16" and plan["activation_checkpointing"] and plan["fsdp"]
    assert plan["tokens_per_step"] == cfg.data.batch_size * 8192 * cfg.train.grad_accum * 8
    assert f"{plan['tokens_per_step']:,} tokens per step" in text
    assert 0 < plan["memory_per_device_gib"]["total"] < 80  # fits an 80 GB device on 8 ranks
    one = dry_run(cfg, world_size=1, file=io.StringIO())
    assert one["memory_per_device_gib"]["weights_grads_optimizer"] == pytest.approx(
        8 * plan["memory_per_device_gib"]["weights_grads_optimizer"])


def test_config_loading(tmp_path):
    tiny = load(PretrainConfig, ROOT / "configs" / "train" / "tiny.toml")
    assert tiny.model.config.vocab_size == 8192 and tiny.data.shards == ["runs/data/builtin/tokens"]
    assert tiny.out_dir == "runs/tiny/pretrain"
    cfg = load(PretrainConfig, ROOT / "configs" / "train" / "tiny.toml",
                      ["train.steps=70", "optim.lr=1e-3", "train.dtype=bf16", "model.dim=32", 'data.shards=["a", "b"]'])
    assert (cfg.train.steps, cfg.optim.lr, cfg.train.dtype, cfg.model.config.dim) == (70, 1e-3, torch.bfloat16, 32)
    assert cfg.data.shards == ["a", "b"]
    (tmp_path / "resolved.toml").write_text(to_toml(cfg))
    assert load(PretrainConfig, tmp_path / "resolved.toml") == cfg
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstpes = 3\n")
    with pytest.raises(GemmalabError, match=r"bad\.toml.*train\.stpes"):
        load(PretrainConfig, bad)
    bad.write_text("[model]\npreset = 'tiny-gemma'\nlayers = 3\n")
    with pytest.raises(GemmalabError, match=r"bad\.toml.*model\.layers"):
        load(PretrainConfig, bad)
    with pytest.raises(GemmalabError, match="`train.steps` must be int"):
        load(PretrainConfig, None, ["train.steps=ten"])
    with pytest.raises(GemmalabError, match="train.dtype"):
        load(PretrainConfig, None, ["train.dtype=fp16"])


def test_a_disk_full_at_export_or_in_metrics_is_a_named_error_and_resumable(shards, tmp_path, monkeypatch):
    """Disk full while exporting the model: no half-written model folder, a message naming it, and --resume exports
    from the kept checkpoint. Disk full while recording a step: a message naming metrics.jsonl."""
    import errno

    import gemmalab.checkpoint.hf as hf
    from gemmalab.runs import MetricsLogger

    cfg = load(PretrainConfig, _config_file(tmp_path, shards), ["train.steps=4", "checkpoint.every=2"])
    save_hf = hf.save_hf

    def full_disk(model, directory, tokenizer=None):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf, "save_hf", full_disk)
    with pytest.raises(GemmalabError, match=r"could not be exported to .*model: No space left on device.*--resume"):
        pretrain(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model").exists() and not list((tmp_path / "run").glob(".model*"))
    monkeypatch.setattr(hf, "save_hf", save_hf)
    resumed = load(PretrainConfig, _config_file(tmp_path, shards), ["train.steps=4", "checkpoint.every=2"])
    result = pretrain(resumed, tmp_path / "run", progress=False, resume=True)
    assert result["status"] == "finished" and (tmp_path / "run" / "model" / "config.json").is_file()

    class FullFile(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    with MetricsLogger(tmp_path / "m", tensorboard=False) as logger:
        logger._file = FullFile()
        with pytest.raises(GemmalabError, match=r"metrics.jsonl: could not record step 3 \(No space left"):
            logger.log(3, {"loss": 1.0})
