"""A second objective on the shared loop, written here and nowhere else: the loop trains it from `init_from` a saved
model directory, checkpoints it and resumes it exactly, without a line of the loop knowing about it.

The toy task: read a row of random tokens and predict, at its last position, the row's first token (a copy over
the whole row), on two batches in turn. Batches come from a seeded iterator with state_dict / load_state_dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from gemmalab.config import load
from gemmalab.errors import GemmalabError
from gemmalab.train.config import CheckpointSection, DebugSection, ModelSpec, TrainSection
from gemmalab.train.loop import LossOutput, Trainer
from gemmalab.train.metrics import CarbonConfig
from gemmalab.train.optim import OptimConfig


@dataclass
class CopyData:
    rows: int = 4
    length: int = 12
    seed: int = 0


@dataclass
class CopyConfig:
    """A stage config: the shared sections and its own [data]."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: CopyData = field(default_factory=CopyData)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    carbon: CarbonConfig = field(default_factory=CarbonConfig)
    debug: DebugSection = field(default_factory=DebugSection)

    def __post_init__(self) -> None:
        self.optim = self.optim.for_run(self.train.steps)


class CopyBatches:
    """Seeded batches [rows, length] of token ids 3..vocab-1, two of them in turn (a task 10 steps can learn); the
    state is the number of batches made."""

    def __init__(self, cfg: CopyData, vocab: int) -> None:
        self.cfg, self.vocab, self.made = cfg, vocab, 0

    def __next__(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.made % 2)
        self.made += 1
        return torch.randint(3, self.vocab, (self.cfg.rows, self.cfg.length), generator=g)

    def state_dict(self) -> dict:
        return {"made": self.made}

    def load_state_dict(self, state: dict) -> None:
        self.made = state["made"]


class CopyObjective:
    """Cross-entropy of the last position's logits against the row's first token, summed over rows."""

    def units(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.tensor(batch.shape[0])

    def tokens(self, batch: torch.Tensor) -> int:
        return batch.numel()

    def loss(self, model, batch: torch.Tensor) -> LossOutput:
        logits = model(batch, num_logits=1)[:, -1].float()  # [B, V]
        loss = F.cross_entropy(logits, batch[:, 0], reduction="sum")
        correct = (logits.argmax(-1) == batch[:, 0]).sum().float()
        return LossOutput(loss, {"accuracy": correct})


def copy_stage(cfg: CopyConfig, out, resume: bool = False) -> tuple[dict, torch.nn.Module]:
    """What a stage module holds: build the model, the objective and the batches, and hand them to the loop."""
    trainer = Trainer(cfg, out, "copy", resume)
    model, tokenizer = trainer.build_model()
    batches = CopyBatches(cfg.data, cfg.model.config.vocab_size)
    result = trainer.fit(model, CopyObjective(), batches, seq_len=cfg.data.length, tokenizer=tokenizer, progress=False)
    return result, model


@pytest.fixture(scope="module")
def start_model(tiny_tokenizer, tmp_path_factory):
    """A saved model directory (HF layout, with its tokenizer) to start from."""
    from gemmalab.checkpoint import save_hf
    from gemmalab.model import Gemma, get_preset

    model = Gemma(get_preset("tiny-gemma"))
    model.init_weights(std=0.02, seed=11)
    return save_hf(model, tmp_path_factory.mktemp("start") / "model", tiny_tokenizer)


def _config(tmp_path, start_model, *overrides: str) -> CopyConfig:
    path = tmp_path / "copy.toml"
    path.write_text(f"""
[model]
init_from = "{start_model}"

[optim]
lr = 0.01
schedule = "constant"

[train]
steps = 10
seed = 5

[checkpoint]
every = 3
""")
    return load(CopyConfig, path, list(overrides))


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_toy_objective_trains_from_init_from_and_resumes_exactly(start_model, tmp_path):
    import gemmalab

    cfg = _config(tmp_path, start_model)
    assert cfg.model.config == gemmalab.load(start_model)[0].config  # [model] resolved from the saved model's config

    # The first step's loss is the starting model's loss on the first batch: the weights came from init_from.
    start, _ = gemmalab.load(start_model)
    first = next(CopyBatches(cfg.data, cfg.model.config.vocab_size))
    with torch.no_grad():
        expected = CopyObjective().loss(start, first).loss.item() / first.shape[0]

    result, _ = copy_stage(cfg, tmp_path / "full")
    reference = _metrics(tmp_path / "full")
    assert result["status"] == "finished" and result["steps"] == 10
    assert reference[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert "accuracy" in reference[0] and 0 <= reference[-1]["accuracy"] <= 1
    assert reference[-1]["loss"] < reference[0]["loss"]
    # The exported model is a model directory with the tokenizer of init_from, and trained weights.
    exported, tokenizer = gemmalab.load(tmp_path / "full" / "model")
    assert tokenizer is not None and tokenizer.fingerprint() == gemmalab.load_tokenizer(start_model).fingerprint()
    assert not torch.equal(exported.embed.weight, start.embed.weight)

    # The same run stopped after step 6 (checkpoint 6), then resumed to step 10: bit for bit the same figures.
    copy_stage(_config(tmp_path, start_model, "train.steps=6"), tmp_path / "split")
    with pytest.raises(GemmalabError, match="--resume"):
        copy_stage(cfg, tmp_path / "split")  # an earlier run is never silently overwritten
    result, _ = copy_stage(cfg, tmp_path / "split", resume=True)
    assert result["steps"] == 10
    split = _metrics(tmp_path / "split")
    drop = ("tokens_per_s", "mfu", "step_time_s", "mem_peak_rss_gb")  # timing and memory
    assert [{k: v for k, v in r.items() if k not in drop} for r in split] == \
           [{k: v for k, v in r.items() if k not in drop} for r in reference]


def test_model_spec_takes_a_preset_or_init_from_not_both(start_model, tmp_path):
    with pytest.raises(GemmalabError, match=r"copy\.toml.*`model.preset`.*`model.init_from`.*not both"):
        _config(tmp_path, start_model, "model.preset=tiny-gemma")
    # an override that keeps the weights' shapes is applied to the loaded model
    cfg = _config(tmp_path, start_model, "model.max_seq_len=64", "train.steps=1")
    _, model = copy_stage(cfg, tmp_path / "run")
    assert model.config.max_seq_len == 64
    with pytest.raises(GemmalabError, match="does not fit the model config"):
        cfg = _config(tmp_path, start_model, "model.dim=32", "train.steps=1")
        copy_stage(cfg, tmp_path / "run2")
