"""The Bradley-Terry reward model: a Gemma trunk with a scalar head, trained on preference pairs on the shared loop.

    cfg = gemmalab.config.load(RewardConfig, "configs/reward/tiny.toml")
    result = reward(cfg, "runs/tiny/reward")          # what result.json holds
    model, tokenizer = gemmalab.model.heads.load_scored("runs/tiny/reward/model")
    scores = score(model, tokenizer, [(prompt_messages, answer), ...])

Loss per pair: -log sigmoid(r_chosen - r_rejected - margin) + center_coef (r_chosen + r_rejected)^2 (the second term,
Eisenstein et al.'s centring, keeps scores near 0). r is the head at the answer's `<end_of_turn>`, the last real
token of its row (gemmalab.model.heads: safe under left and right padding). Pairs identical before or after
truncation are dropped and counted (they give no gradient). The model starts from `[model] init_from` (an SFT
model) with a seeded head; the held-out pairwise accuracy is measured before and after.

Run directory: config.toml, metrics.jsonl (loss, accuracy, margin, mean chosen and rejected rewards), checkpoints/,
model/ (the trunk as a plain model directory, and reward_head.safetensors), heldout_before.jsonl and
heldout_after.jsonl (both scores of every held-out pair), result.json (stage "reward": heldout_accuracy, ...).
"""

from __future__ import annotations

import json
import random
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from gemmalab.data.preferences import (BuiltinPreferences, Preference, Sampler, builtin_preferences, read_preferences,
                                       render_pair, scored_ids)
from gemmalab.errors import GemmalabError
from gemmalab.files import atomic_write, read_jsonl
from gemmalab.model.heads import REWARD_HEAD, add_head, right_padded, save_head, score_rows, sequence_scores, split_head
from gemmalab.runs import RunDir
from gemmalab.train.config import CheckpointSection, DebugSection, ModelSpec, TrainSection, resolve_run
from gemmalab.train.loop import LossOutput, Trainer
from gemmalab.train.metrics import CarbonConfig
from gemmalab.train.optim import OptimConfig

__all__ = ["bt_loss", "Pair", "PairBatch", "PreferenceBatches", "BradleyTerryObjective", "RewardData",
           "RewardSection", "RewardConfig", "reward", "score", "pair_scores", "model_sampler"]


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
            center_coef: float = 0.0) -> torch.Tensor:
    """The Bradley-Terry loss summed over pairs: -log sigmoid(r_c - r_r - margin) + center_coef (r_c + r_r)^2."""
    diff = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    return loss.sum()


# ---- batches ---------------------------------------------------------------------------------------


@dataclass
class Pair:
    """One rendered pair: the ids of the chosen and the rejected sequence, its margin and origin."""

    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0
    where: str = ""
    kind: str = ""


@dataclass
class PairBatch:
    """B pairs as one right-padded batch of 2B rows: the chosen rows first, then the rejected ones.
    tokens, attention: [2B, T]; margins: [B]."""

    tokens: torch.Tensor
    attention: torch.Tensor
    margins: torch.Tensor

    @property
    def pairs(self) -> int:
        return self.margins.shape[0]


def pair_batch(pairs: Sequence[Pair], pad_id: int) -> PairBatch:
    tokens, attention = right_padded([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    return PairBatch(tokens, attention, torch.tensor([p.margin for p in pairs], dtype=torch.float32))


class PreferenceBatches:
    """Endless, resumable batches of `batch_size` pairs per process. Each epoch visits the pairs in a seeded order
    of (seed, epoch); rank r of world w takes pairs r, r + w, ... of each global batch; the state is (epoch, index)."""

    def __init__(self, pairs: Sequence[Pair], batch_size: int, *, pad_id: int = 0, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if not pairs:
            raise GemmalabError("no preference pairs are left to make batches of")
        self.pairs, self.batch_size, self.pad_id = list(pairs), batch_size, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.index = 0, 0
        self._order: list[int] | None = None

    def _next(self) -> int:
        if self._order is None:
            self._order = list(range(len(self.pairs)))
            random.Random(f"{self.seed}/{self.epoch}").shuffle(self._order)
        if self.index >= len(self._order):
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
            return self._next()
        self.index += 1
        return self._order[self.index - 1]

    def __iter__(self) -> PreferenceBatches:
        return self

    def __next__(self) -> PairBatch:
        mine = [i for r, i in enumerate(self._next() for _ in range(self.batch_size * self.world_size))
                if r % self.world_size == self.rank]
        return pair_batch([self.pairs[i] for i in mine], self.pad_id)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "pairs": len(self.pairs)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("pairs") != len(self.pairs):
            raise GemmalabError(f"the saved batch state is over {state.get('pairs')} pairs, this run has "
                                f"{len(self.pairs)}: resume with the same data")
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


class BradleyTerryObjective:
    """The shared loop's objective: units are pairs; one forward over the chosen and rejected rows together."""

    def __init__(self, center_coef: float = 0.0) -> None:
        self.center_coef = center_coef

    def units(self, batch: PairBatch) -> torch.Tensor:
        return torch.tensor(float(batch.pairs))

    def tokens(self, batch: PairBatch) -> int:
        return int(batch.attention.sum())

    def loss(self, model, batch: PairBatch) -> LossOutput:
        device = model.embed.weight.device
        r = sequence_scores(model, batch.tokens.to(device), batch.attention.to(device))  # [2B]
        chosen, rejected = r[:batch.pairs], r[batch.pairs:]
        loss = bt_loss(chosen, rejected, batch.margins.to(device), self.center_coef)
        d = (chosen - rejected).detach()
        return LossOutput(loss, {"accuracy": (d > 0).float().sum(), "margin": d.sum(),
                                 "reward_chosen": chosen.detach().sum(), "reward_rejected": rejected.detach().sum()})


# ---- config ----------------------------------------------------------------------------------------


@dataclass
class RewardData:
    """`[data]`: preference files and/or the built-in pairs, and how they are batched."""

    train: list[str] = field(default_factory=list)  # preference JSONL files (gemmalab.data.preferences)
    heldout: list[str] = field(default_factory=list)  # held-out files; none: `heldout_fraction` of the train files
    builtin: BuiltinPreferences | None = None  # [data.builtin]: pairs from the checkable tasks
    heldout_fraction: float = 0.05
    batch_size: int = 8  # pairs per process per micro-batch
    seq_len: int = 256  # tokens per sequence at most (longer ones are cut at the end)
    seed: int = 0  # pair order per epoch, and the held-out split of files

    def __post_init__(self) -> None:
        if not self.train and self.builtin is None:
            raise GemmalabError("no preference pairs: give `train` files or a [data.builtin] table")
        if self.batch_size < 1 or self.seq_len < 2 or not 0 <= self.heldout_fraction < 1:
            raise GemmalabError("need `batch_size` >= 1, `seq_len` >= 2 and 0 <= `heldout_fraction` < 1")


@dataclass
class RewardSection:
    """`[reward]`: the loss and the head."""

    center_coef: float = 0.0  # weight of (r_c + r_r)^2; 0.01 is the value Eisenstein et al. recommend
    head_seed: int = 0
    eval_batch_size: int = 32  # pairs scored at once for the held-out accuracy

    def __post_init__(self) -> None:
        if self.center_coef < 0 or self.eval_batch_size < 1:
            raise GemmalabError("need `center_coef` >= 0 and `eval_batch_size` >= 1")


@dataclass
class RewardConfig:
    """Everything a reward-model run needs (TOML sections of the same names)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: RewardData = field(default_factory=lambda: RewardData(builtin=BuiltinPreferences()))
    reward: RewardSection = field(default_factory=RewardSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, weight_decay=0.0))
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    carbon: CarbonConfig = field(default_factory=CarbonConfig)
    debug: DebugSection = field(default_factory=DebugSection)
    out_dir: str = "runs/tiny/reward"

    def __post_init__(self) -> None:
        resolve_run(self)


# ---- data ------------------------------------------------------------------------------------------


def model_sampler(model, tokenizer, max_new_tokens: int, seed: int = 0, batch_size: int = 64) -> Sampler:
    """A Sampler of the built-in pairs' "sampled" kind: `model`'s answers at temperature 1, each seeded by its prompt,
    the attempt and `seed` (the same pairs on every run and every rank)."""
    from gemmalab.inference import Engine, SamplingParams
    from gemmalab.inference.engine import eval_mode

    engine = Engine(model, tokenizer, max_batch_size=batch_size)

    def sample(prompts: list[list[dict]], attempt: int) -> list[str]:
        ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True) for p in prompts]
        params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0,
                                 seed=zlib.crc32(f"{seed}/{attempt}/{json.dumps(p)}".encode())) for p in prompts]
        with eval_mode(model):
            return [c.text for c in engine.generate(ids, params)]

    return sample


def _pairs(cfg: RewardConfig, tokenizer, sample: Sampler | None = None) -> tuple[list[Pair], list[Pair], dict]:
    """(train pairs, held-out pairs, counts). Counts reconcile: read = malformed + dropped by reason + kept."""
    data = cfg.data
    counts = {"pairs_read": 0, "malformed_lines": 0, "malformed_examples": [], "dropped": Counter()}

    def collect(paths: list[str]) -> list[Preference]:
        out = []
        for path in paths:
            for where, pref, problem in read_preferences(path):
                counts["pairs_read"] += 1
                if pref is None:
                    counts["malformed_lines"] += 1
                    if len(counts["malformed_examples"]) < 5:
                        counts["malformed_examples"].append(problem)
                else:
                    out.append(pref)
        return out

    train, heldout = collect(data.train), collect(data.heldout)
    if data.train and not data.heldout and data.heldout_fraction > 0:  # a seeded split of the files' pairs
        order = list(range(len(train)))
        random.Random(f"heldout/{data.seed}").shuffle(order)
        cut = round(len(train) * data.heldout_fraction)
        held = set(order[:cut])
        heldout = [p for i, p in enumerate(train) if i in held]
        train = [p for i, p in enumerate(train) if i not in held]
    if data.builtin is not None:
        built_train, built_held = builtin_preferences(data.builtin, sample)
        counts["pairs_read"] += len(built_train) + len(built_held)
        train, heldout = train + built_train, heldout + built_held

    def rendered(prefs: list[Preference]) -> list[Pair]:
        out = []
        for p in prefs:
            r = render_pair(tokenizer, p, data.seq_len)
            if isinstance(r, str):
                counts["dropped"][r] += 1
            else:
                out.append(Pair(r[0], r[1], p.margin, p.where, p.kind))
        return out

    train_pairs, held_pairs = rendered(train), rendered(heldout)
    counts["dropped"] = dict(counts["dropped"])
    counts["pairs_trained"], counts["heldout_pairs"] = len(train_pairs), len(held_pairs)
    counts["reconciled"] = counts["pairs_read"] == (counts["malformed_lines"] + sum(counts["dropped"].values())
                                                    + len(train_pairs) + len(held_pairs))
    if not train_pairs:
        raise GemmalabError(f"No training pair is left: {counts['malformed_lines']} malformed lines, dropped "
                            f"{counts['dropped']} (first problems: {counts['malformed_examples']}).")
    return train_pairs, held_pairs, counts


# ---- scoring ---------------------------------------------------------------------------------------


@torch.no_grad()
def pair_scores(model, pairs: Sequence[Pair], pad_id: int, batch_size: int = 32) -> list[tuple[float, float]]:
    """(r_chosen, r_rejected) of each pair, in batches of `batch_size` pairs."""
    from gemmalab.inference.engine import eval_mode

    device, out = model.embed.weight.device, []
    with eval_mode(model):
        for s in range(0, len(pairs), batch_size):
            b = pair_batch(pairs[s:s + batch_size], pad_id)
            r = sequence_scores(model, b.tokens.to(device), b.attention.to(device)).tolist()
            out += list(zip(r[:b.pairs], r[b.pairs:]))
    return out


def score(model, tokenizer, items: Sequence[tuple[list[dict] | str, str]], batch_size: int = 32) -> list[float]:
    """The reward of each (prompt, answer): the prompt a string (one user turn) or messages before the answer."""
    rows = [scored_ids(tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else list(p), a)
            for p, a in items]
    return score_rows(model, rows, tokenizer.pad_id, batch_size)


def _heldout(run: RunDir, when: str, model, pairs: list[Pair], cfg: RewardConfig, pad_id: int, reuse: bool,
             write: bool) -> dict:
    """Held-out pairwise accuracy (ties count as wrong), mean margin and accuracy by rejected kind; every pair's scores
    in OUT/heldout_{when}.jsonl with a last "_summary" line (reused on resume: the "before" weights are gone)."""
    path = run.path / f"heldout_{when}.jsonl"
    if not pairs:
        return {"accuracy": None, "margin": None, "n": 0, "by_kind": {}}
    if reuse and path.is_file():
        summary = [obj for _, obj in read_jsonl(path) if obj.get("id") == "_summary"]
        if summary and summary[0].get("n") == len(pairs):
            return {k: summary[0][k] for k in ("accuracy", "margin", "n", "by_kind")}
    scores = pair_scores(model, pairs, pad_id, cfg.reward.eval_batch_size)
    records = [{"id": p.where, "kind": p.kind, "chosen": c, "rejected": r, "correct": c > r}
               for p, (c, r) in zip(pairs, scores)]
    by_kind: dict[str, list[bool]] = {}
    for rec in records:
        by_kind.setdefault(rec["kind"] or "file", []).append(rec["correct"])
    figures = {"accuracy": sum(r["correct"] for r in records) / len(records),
               "margin": sum(r["chosen"] - r["rejected"] for r in records) / len(records), "n": len(records),
               "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}}
    if write:
        run.create()
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records + [{"id": "_summary",
                                                                                                 **figures}]))
    return figures


# ---- the stage -------------------------------------------------------------------------------------


def reward(cfg: RewardConfig, out: str | Path | None = None, resume: bool = False, *,
           progress: bool | None = None) -> dict:
    """Train (or resume) a reward model into `out` (default `cfg.out_dir`); returns what result.json holds."""
    trainer = Trainer(cfg, out if out is not None else cfg.out_dir, "reward", resume)
    d, run = trainer.dist, trainer.run
    model, tokenizer = trainer.build_model()
    if tokenizer is None:
        raise GemmalabError("A reward model needs a tokenizer: set model.init_from to a model that has one.")
    builtin = cfg.data.builtin
    sample = None
    if builtin is not None and "sampled" in builtin.kinds:  # the trunk's own wrong answers, before it has a head
        sample = model_sampler(model, tokenizer, builtin.sample_tokens, builtin.seed, cfg.reward.eval_batch_size)
    train, heldout, counts = _pairs(cfg, tokenizer, sample)
    add_head(model, REWARD_HEAD, seed=cfg.reward.head_seed)  # before fit: checkpoints hold it, resume restores it
    before = _heldout(run, "before", model, heldout, cfg, tokenizer.pad_id, reuse=True, write=d.is_main)
    batches = PreferenceBatches(train, cfg.data.batch_size, pad_id=tokenizer.pad_id, seed=cfg.data.seed, rank=d.rank,
                                world_size=d.world_size)

    def export(state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:  # rank 0, the full state
        trunk, head = split_head(state, REWARD_HEAD)
        save_head(head, folder, REWARD_HEAD)
        return trunk

    result = trainer.fit(model, BradleyTerryObjective(cfg.reward.center_coef), batches, seq_len=cfg.data.seq_len,
                         tokenizer=tokenizer, progress=progress, export_state=export)
    status = result.pop("status")
    if status != "finished":
        return {"stage": "reward", "status": status, **result}
    after = _heldout(run, "after", model, heldout, cfg, tokenizer.pad_id, reuse=False, write=d.is_main)
    figures = {"heldout_accuracy": after["accuracy"], "heldout_accuracy_before": before["accuracy"],
               "heldout_margin": after["margin"], "heldout_margin_before": before["margin"],
               "heldout_accuracy_by_kind": {"before": before["by_kind"], "after": after["by_kind"]},
               **counts, **result}
    if d.is_main:
        run.write_result(status, figures)
    return {"stage": "reward", "status": status, **figures}
