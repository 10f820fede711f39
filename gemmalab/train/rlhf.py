"""RLHF: policy optimisation of an SFT model against a reward model, with a KL penalty to the SFT model and guards
against reward hacking. RLOO by default, PPO as an option (gemmalab.train.rl has the arithmetic).

    cfg = gemmalab.config.load(RLHFConfig, "configs/rlhf/tiny.toml")
    result = rlhf(cfg, "runs/tiny/rlhf")          # what result.json holds

One step: draw `prompts_per_step` training prompts (seeded by the step), sample `samples_per_prompt` answers each
through the inference engine with the policy's current weights; score them with the reward model (minus
`missing_eot_penalty` for an answer that did not end its turn; clipped, optionally whitened); take the
log-probabilities of the policy (pi_old), the frozen SFT reference and, for PPO, the values; then RLOO: reward - beta
x KL per sequence, leave-one-out baseline, the clipped sequence-level loss; or PPO: per-token rewards -beta x KL with
the score at the last token, GAE, the clipped per-token loss and a clipped value loss (a value head on the policy's
trunk). `epochs` passes over the step's sequences in minibatches, one AdamW update each, then one LR-schedule step.
An adaptive KL controller moves beta toward `kl_target` if set.

Guards: the missing-`<end_of_turn>` penalty, reward clipping or whitening, a KL ceiling (the run stops), length
monitoring (optionally a ceiling), and every `judge_every` steps a side-by-side check of the policy's greedy answers
against the SFT model's by a separate judge (gemmalab.evaluate.judges; by default exact reference answers): when the
reward model's score has risen since the best check while the judge's win rate has fallen from it by more than
`win_drop`, the run is flagged and stops, and OUT/model is the best checkpoint's policy (OUT/best_model).

Each step's figures go to metrics.jsonl: reward, rm_score, kl (and kl_k1, kl_k3), entropy, length, ended_turn,
clip_frac, beta, loss, judge_win_rate (at checks), and the time of rollout, scoring and update. Checkpoints hold the
policy, the optimizer, the schedule, beta and the guard's state; prompts and sampling seeds are functions of the
step, so a resumed run repeats the uninterrupted one. One process (CPU or one GPU): torchrun is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.distributed as dist

from gemmalab.data.dialogue import read_dialogues
from gemmalab.data.instruct import BuiltinTasks, builtin_dialogues, is_correct
from gemmalab.errors import GemmalabError
from gemmalab.evaluate import winrate
from gemmalab.evaluate.judges import Pairing
from gemmalab.evaluate.sxs import JudgeConfig, in_model_terms, make_judge
from gemmalab.files import atomic_write, read_jsonl
from gemmalab.model.heads import (REWARD_HEAD, VALUE_HEAD, add_head, load_scored, right_padded, score_rows, split_head,
                                  token_values)
from gemmalab.train import rl
from gemmalab.train.checkpoint import load_checkpoint, save_checkpoint
from gemmalab.train.config import CheckpointSection, DebugSection, ModelSpec, TrainSection, resolve_run
from gemmalab.train.debug import FaultInjector
from gemmalab.train.loop import StopFlag, Trainer, jsonable
from gemmalab.train.metrics import CarbonConfig, carbon
from gemmalab.train.optim import OptimConfig, build_optimizer, build_scheduler
from gemmalab.train.sft import HeldoutSection

__all__ = ["RLHFData", "RewardSource", "RLSection", "GuardSection", "RLHFConfig", "Scorer", "RewardModelScorer",
           "GuardState", "rlhf"]

log = logging.getLogger(__name__)

# A reward: (prompt ids, response ids) per sequence -> one score each. A response that ended its turn ends with
# <end_of_turn>, the token a reward model of gemmalab.train.reward reads its head at.
Scorer = Callable[[list[list[int]], list[list[int]]], list[float]]


# ---- config ---------------------------------------------------------------------------------------


@dataclass
class RLHFData:
    """`[data]`: the prompts. The built-in checkable tasks give training prompts and held-out ones with answers (the
    accuracy before and after, and the judge's prompts); `prompts` adds JSONL files of training prompts
    (`{"prompt": str}` or `{"messages": [...]}` ending in a user turn)."""

    builtin: BuiltinTasks | None = field(default_factory=BuiltinTasks)
    prompts: list[str] = field(default_factory=list)
    seq_len: int = 256  # prompt + answer positions; longer prompts are dropped and counted
    batch_size: int = 32  # rows generated at once (rollouts and held-out answers) and scored at once
    seed: int = 0  # which prompts each step draws

    def __post_init__(self) -> None:
        if self.builtin is None and not self.prompts:
            raise GemmalabError("no prompts: give `prompts` files or a [data.builtin] table")
        if self.batch_size < 1 or self.seq_len < 2:
            raise GemmalabError(f"`batch_size` must be >= 1 and `seq_len` >= 2, got {self.batch_size} and {self.seq_len}")


@dataclass
class RewardSource:
    """`[reward]`: the reward model (a `gemmalab reward` model directory or run directory) and how its score is
    shaped before the KL term."""

    model: str = "runs/tiny/reward/model"
    missing_eot_penalty: float = 1.0  # subtracted from the score of an answer without <end_of_turn>
    clip: float | None = 10.0  # scores clipped to [-clip, clip] (None: no clipping)
    whiten: bool = False  # scores whitened over each step's samples (their mean kept)

    def __post_init__(self) -> None:
        if self.missing_eot_penalty < 0 or (self.clip is not None and not self.clip > 0):
            raise GemmalabError("`missing_eot_penalty` must be >= 0 and `clip` positive or unset")


ALGORITHMS = ("rloo", "ppo")


@dataclass
class RLSection:
    """`[rlhf]`: the algorithm and its settings (defaults: TRL's RLOO and PPO, see docs/alignment.md)."""

    algorithm: str = "rloo"
    prompts_per_step: int = 8
    samples_per_prompt: int = 4  # k: RLOO's group (>= 2); PPO samples as many
    max_new_tokens: int = 32
    temperature: float = 1.0  # sampling, and the log-probabilities of the ratio and the KL
    epochs: int = 1  # passes over a step's samples
    minibatch_size: int = 16  # sequences per update
    clip: float = 0.2  # policy ratio clip
    beta: float = 0.05  # KL coefficient (the start, with an adaptive controller)
    kl_estimator: str = "k1"  # in the reward: k1 (unbiased, signed) or k3 (non-negative); both are logged
    kl_target: float | None = None  # adaptive KL: beta moves so the per-sequence KL approaches this
    kl_horizon: int = 10000
    normalize_advantages: bool = False  # RLOO: whiten the advantages of each step
    vf_coef: float = 0.1  # PPO
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95

    def __post_init__(self) -> None:
        problems = []
        if self.algorithm not in ALGORITHMS:
            problems.append(f"`algorithm` must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.kl_estimator not in rl.KL_ESTIMATORS:
            problems.append(f"`kl_estimator` must be one of {', '.join(rl.KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        for name in ("prompts_per_step", "max_new_tokens", "epochs", "minibatch_size", "kl_horizon"):
            if getattr(self, name) < 1:
                problems.append(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt < (2 if self.algorithm == "rloo" else 1):
            problems.append(f"`samples_per_prompt` must be >= 2 for RLOO (its baseline is the other samples), got "
                            f"{self.samples_per_prompt}")
        if not self.temperature > 0:
            problems.append(f"`temperature` must be > 0 (the policy samples), got {self.temperature}")
        if not 0 < self.clip < 1 or self.beta < 0 or self.value_clip <= 0 or self.vf_coef < 0:
            problems.append("need 0 < `clip` < 1, `beta` >= 0, `value_clip` > 0, `vf_coef` >= 0")
        if self.kl_target is not None and not self.kl_target > 0:
            problems.append(f"`kl_target` must be positive or unset, got {self.kl_target}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            problems.append("`gamma` and `lam` must be in [0, 1]")
        if problems:
            raise GemmalabError("; ".join(problems))


@dataclass
class GuardSection:
    """`[guard]`: what stops a run that games its reward model."""

    kl_ceiling: float | None = 50.0  # the run stops when the mean per-sequence KL (k3) exceeds this
    max_length_ratio: float | None = None  # ... or the mean answer length exceeds this multiple of the first step's
    judge_every: int = 25  # steps between side-by-side checks against the SFT model (0: none)
    judge_prompts: int = 32  # held-out prompts the judge sees (beyond those of the held-out accuracy)
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(model="reference-exact"))
    win_drop: float = 0.05  # flagged: the win rate this far below the best check's ...
    reward_rise: float = 0.0  # ... while the mean score is this far above the best check's

    def __post_init__(self) -> None:
        if self.judge_every < 0 or self.judge_prompts < 1:
            raise GemmalabError("`judge_every` must be >= 0 and `judge_prompts` >= 1")
        if (self.kl_ceiling is not None and not self.kl_ceiling > 0) or \
                (self.max_length_ratio is not None and not self.max_length_ratio > 0):
            raise GemmalabError("`kl_ceiling` and `max_length_ratio` must be positive or unset")


@dataclass
class RLHFConfig:
    """Everything an RLHF run needs (TOML sections of the same names). `train.steps` counts RL steps."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: RLHFData = field(default_factory=RLHFData)
    reward: RewardSource = field(default_factory=RewardSource)
    rlhf: RLSection = field(default_factory=RLSection)
    guard: GuardSection = field(default_factory=GuardSection)
    heldout: HeldoutSection = field(default_factory=HeldoutSection)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-6, weight_decay=0.0))
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    carbon: CarbonConfig = field(default_factory=CarbonConfig)
    debug: DebugSection = field(default_factory=DebugSection)
    out_dir: str = "runs/tiny/rlhf"

    def __post_init__(self) -> None:
        resolve_run(self)
        if self.rlhf.max_new_tokens >= self.data.seq_len:
            raise GemmalabError(f"`rlhf.max_new_tokens` ({self.rlhf.max_new_tokens}) leaves no room for a prompt in "
                                f"`data.seq_len` ({self.data.seq_len})")
        if self.train.grad_accum != 1:
            raise GemmalabError("RLHF updates per minibatch (`rlhf.minibatch_size`); leave `train.grad_accum` at 1")


# ---- prompts --------------------------------------------------------------------------------------


@dataclass
class RLPrompt:
    """A prompt: its messages, their ids in the dialogue format (ending with the model's turn opened), and the
    answer when it is checkable."""

    id: str
    messages: list[dict]
    ids: list[int]
    answer: str | None = None
    task: str = ""


def _prompts(cfg: RLHFConfig, tokenizer) -> tuple[list[RLPrompt], list[RLPrompt], list[RLPrompt], dict]:
    """(training prompts, held-out prompts, the judge's prompts, counts). Counts reconcile: read = malformed +
    too long + kept."""
    data, room = cfg.data, cfg.data.seq_len - cfg.rlhf.max_new_tokens
    train, heldout, judged = [], [], []
    counts = {"prompts_read": 0, "malformed": 0, "too_long": 0, "malformed_examples": []}

    def make(pid: str, messages: list[dict], answer: str | None, task: str) -> RLPrompt | None:
        counts["prompts_read"] += 1
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if len(ids) > room:
            counts["too_long"] += 1
            return None
        return RLPrompt(pid, messages, ids, answer, task)

    if data.builtin is not None:
        b = data.builtin
        n_held = (cfg.heldout.limit or b.heldout)
        tasks = dataclasses.replace(b, heldout=n_held + cfg.guard.judge_prompts)
        train_ex, held_ex = builtin_dialogues(tasks)
        for i, e in enumerate(train_ex):
            train.append(make(f"builtin:{e['task']}:{i}", e["messages"][:-1], e["answer"], e["task"]))
        for i, e in enumerate(held_ex):  # the first for accuracy, the rest for the judge: disjoint
            (heldout if i < n_held else judged).append(
                make(f"heldout:{e['task']}:{i}", e["messages"][:-1], e["answer"], e["task"]))
    for path in data.prompts:
        for where, messages, problem in _prompt_lines(path):
            if messages is None:
                counts["prompts_read"] += 1
                counts["malformed"] += 1
                if len(counts["malformed_examples"]) < 5:
                    counts["malformed_examples"].append(problem)
                continue
            train.append(make(where, messages, None, Path(path).stem))
    train, heldout, judged = ([p for p in ps if p is not None] for ps in (train, heldout, judged))
    if not train:
        raise GemmalabError(f"No training prompt is left: {counts}")
    counts["prompts_train"], counts["prompts_heldout"], counts["prompts_judge"] = len(train), len(heldout), len(judged)
    return train, heldout, judged, counts


def _prompt_lines(path: str):
    """(where, messages | None, problem) of a prompt file: `{"prompt": str}` or `{"messages": [...]}` whose last
    message is the user's."""
    from gemmalab.files import jsonl_lines

    for n, obj, problem in jsonl_lines(path):
        where = f"{path}, line {n}"
        if problem is None:
            if isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
                yield where, [{"role": "user", "content": obj["prompt"]}], None
                continue
            if "messages" in obj:
                from gemmalab.data.dialogue import parse_dialogue

                try:
                    messages = parse_dialogue(obj)
                except GemmalabError as e:
                    yield where, None, f"{where}: {e}"
                    continue
                if messages[-1]["role"] == "model":
                    yield where, None, f"{where}: the last message must be the user's (the policy answers it)"
                    continue
                yield where, messages, None
                continue
            problem = 'expected {"prompt": str} or {"messages": [...]} ending in a user turn'
        yield where, None, f"{where}: {problem}"


# ---- scoring and log-probabilities ------------------------------------------------------------------


class RewardModelScorer:
    """A reward model of `gemmalab reward` as a Scorer: its head at each sequence's last token, batched."""

    def __init__(self, model, tokenizer, batch_size: int = 32) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.model.requires_grad_(False)
        self.device = model.embed.weight.device

    @classmethod
    def load(cls, ref: str, device, batch_size: int = 32) -> RewardModelScorer:
        model, tokenizer = load_scored(ref, REWARD_HEAD, torch.float32, device)
        return cls(model, tokenizer, batch_size)

    def __call__(self, prompts: list[list[int]], responses: list[list[int]]) -> list[float]:
        rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
        return score_rows(self.model, rows, self.tokenizer.pad_id, self.batch_size)


def _logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The output projection (and final soft-cap) of hidden states [..., D] -> [..., V] in fp32."""
    c = model.config
    logits = model.lm_head(hidden) if model.lm_head is not None else F.linear(hidden, model.embed.weight)
    logits = logits.float()
    if c.final_softcap is not None:
        logits = torch.tanh(logits / c.final_softcap) * c.final_softcap
    return logits


def token_logprobs(model, tokens: torch.Tensor, attention: torch.Tensor, response: torch.Tensor, temperature: float,
                   values: bool = False) -> dict[str, torch.Tensor]:
    """Per-token log-probabilities of the sampled response tokens under `model` at `temperature`.

    tokens, attention [B, T]; response [B, T - 1]: True where target tokens[:, 1:] is a response token. Returns
    {"logp", "entropy"} [B, T - 1] (zero off the response) and, with `values`, the value head's "values" [B, T - 1]
    (the value of the state each response token is chosen in)."""
    h = model(tokens[:, :-1], attention_mask=attention[:, :-1], return_hidden=True)  # [B, T-1, D]
    logits = _logits(model, h) / temperature  # [B, T-1, V]
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    m = response.to(logp.dtype)
    out = {"logp": logp * m, "entropy": -(logp_all.exp() * logp_all).sum(-1).detach() * m}
    if values:
        out["values"] = token_values(model, h) * m
    return out


# ---- one step -------------------------------------------------------------------------------------


@dataclass
class Rollouts:
    """One step's samples: N = prompts x samples, prompt-major. tokens, attention [N, T]; response [N, T - 1]."""

    prompts: list[RLPrompt]
    responses: list[list[int]]  # the sampled ids, with the stop token when one ended the answer
    texts: list[str]
    ended: list[bool]  # the answer ended with <end_of_turn>
    tokens: torch.Tensor
    attention: torch.Tensor
    response: torch.Tensor


def _rollouts(engine, prompts: list[RLPrompt], rlc: RLSection, seed: int, step: int, pad_id: int, eot: int,
              device) -> Rollouts:
    from gemmalab.inference import SamplingParams

    k = rlc.samples_per_prompt
    rows = [p for p in prompts for _ in range(k)]
    params = [SamplingParams(max_new_tokens=rlc.max_new_tokens, temperature=rlc.temperature,
                             seed=zlib.crc32(f"{seed}/{step}/{i}".encode())) for i in range(len(rows))]
    outs = engine.generate([p.ids for p in rows], params)
    responses = [c.ids + ([c.stop_id] if c.stop_id is not None else []) for c in outs]
    if any(not r for r in responses):  # an empty answer still has its stop token; the length limit is >= 1
        raise GemmalabError("a sampled answer has no tokens")
    tokens, attention = right_padded([p.ids + r for p, r in zip(rows, responses)], pad_id, device)
    response = torch.zeros(len(rows), tokens.shape[1] - 1, dtype=torch.bool, device=device)
    for b, (p, r) in enumerate(zip(rows, responses)):
        response[b, len(p.ids) - 1:len(p.ids) - 1 + len(r)] = True  # targets of positions predicting the answer
    return Rollouts(rows, responses, [c.text for c in outs], [c.stop_id == eot for c in outs], tokens, attention,
                    response)


def _shaped_scores(raw: torch.Tensor, ended: torch.Tensor, src: RewardSource) -> torch.Tensor:
    """The reward model's scores [N] with the guards applied: the missing-<end_of_turn> penalty, clipping, whitening."""
    s = raw - src.missing_eot_penalty * (~ended).to(raw.dtype)
    if src.clip is not None:
        s = s.clamp(-src.clip, src.clip)
    if src.whiten and s.numel() > 1:
        s = rl.whiten(s, shift_mean=False)
    return s


def _mean(x: torch.Tensor) -> float:
    return float(x.float().mean()) if x.numel() else math.nan


@dataclass
class GuardState:
    """The side-by-side checks so far and the best of them (highest win rate; step 0 is the SFT model itself, win
    rate 0.5). A check's score is the reward model's mean score of the policy's greedy answers to the judge's
    prompts: the same prompts every time, no sampling noise."""

    best_step: int = 0
    best_win_rate: float = 0.5
    best_score: float = math.nan  # step 0: the SFT model's answers' score
    checks: list[dict] = field(default_factory=list)
    first_length: float | None = None

    def check(self, step: int, win_rate: float, score: float, cfg: GuardSection) -> dict:
        """Record a check; returns its figures with "flagged" (the score rose while the win rate fell) and "best"
        (a new best checkpoint)."""
        flagged = win_rate < self.best_win_rate - cfg.win_drop and score > self.best_score + cfg.reward_rise
        best = not flagged and win_rate > self.best_win_rate
        if best:
            self.best_step, self.best_win_rate, self.best_score = step, win_rate, score
        record = {"step": step, "win_rate": win_rate, "score": score, "best_step": self.best_step,
                  "best_win_rate": self.best_win_rate, "best_score": self.best_score, "flagged": flagged, "best": best}
        self.checks.append(record)
        return record


def _greedy_answers(engine, prompts: list[RLPrompt], max_new_tokens: int, scorer: Scorer) -> tuple[list[str], float]:
    """The greedy answers to `prompts` and the reward model's mean score of them."""
    from gemmalab.inference import SamplingParams

    outs = engine.generate([p.ids for p in prompts], SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    responses = [c.ids + ([c.stop_id] if c.stop_id is not None else []) for c in outs]
    scores = scorer([p.ids for p in prompts], [r or [engine.tokenizer.eos_id] for r in responses])
    return [c.text for c in outs], sum(scores) / len(scores)


def _judge_win_rate(judge, prompts: list[RLPrompt], policy_answers: list[str], sft_answers: list[str]
                    ) -> dict:
    """The policy against the SFT model on `prompts`, each judged in both seats (a win needs both; sxs's rule)."""
    pairings = []
    for p, mine, theirs in zip(prompts, policy_answers, sft_answers):
        text = p.messages[-1]["content"]
        pairings += [Pairing(text, mine, theirs, p.answer), Pairing(text, theirs, mine, p.answer)]
    verdicts = judge.judge(pairings)
    outcomes = [winrate.combine(in_model_terms(verdicts[2 * i].choice, "ab"),
                                in_model_terms(verdicts[2 * i + 1].choice, "ba")) for i in range(len(prompts))]
    return {"win_rate": winrate.win_rate(outcomes), "wins": outcomes.count(winrate.MODEL),
            "ties": outcomes.count(winrate.TIE), "losses": outcomes.count(winrate.BASELINE)}


# ---- held-out figures ---------------------------------------------------------------------------


@torch.no_grad()
def _evaluate(policy, tokenizer, prompts: list[RLPrompt], cfg: RLHFConfig, scorer: Scorer) -> tuple[dict, list[dict]]:
    """Greedy answers to the held-out prompts: exact-match accuracy, the reward model's mean score, the length and the
    share that ended their turn; and one record per prompt."""
    from gemmalab.inference import Engine, SamplingParams

    if not prompts:
        return {"accuracy": None, "reward": None, "length": None, "ended_turn": None, "n": 0, "by_task": {}}, []
    engine = Engine(policy, tokenizer, max_batch_size=cfg.heldout.batch_size)
    outs = engine.generate([p.ids for p in prompts], SamplingParams(max_new_tokens=cfg.heldout.max_new_tokens,
                                                                   temperature=0.0))
    responses = [c.ids + ([c.stop_id] if c.stop_id is not None else []) for c in outs]
    scores = scorer([p.ids for p in prompts], [r if r else [tokenizer.eos_id] for r in responses])
    records = [{"id": p.id, "task": p.task, "answer": p.answer, "output": c.text, "correct": is_correct(c.text, p.answer),
                "ended_turn": c.stop_id == tokenizer.end_of_turn_id, "tokens": len(c.ids), "reward": s}
               for p, c, s in zip(prompts, outs, scores)]
    by_task: dict[str, list[bool]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r["correct"])
    n = len(records)
    figures = {"accuracy": sum(r["correct"] for r in records) / n, "reward": sum(scores) / n,
               "length": sum(r["tokens"] for r in records) / n, "ended_turn": sum(r["ended_turn"] for r in records) / n,
               "n": n, "by_task": {t: sum(v) / len(v) for t, v in sorted(by_task.items())}}
    return figures, records


def _evaluate_once(path: Path, reuse: bool, *args) -> dict:
    """`_evaluate`, its records written to `path` with a last "_summary" line; with `reuse`, figures already there
    are read back (a resumed run's "before" was measured on the SFT weights it no longer holds)."""
    if reuse and path.is_file():
        summary = [obj for _, obj in read_jsonl(path) if obj.get("id") == "_summary"]
        if summary:
            return {k: v for k, v in summary[0].items() if k != "id"}
    figures, records = _evaluate(*args)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records + [{"id": "_summary",
                                                                                             **figures}]))
    return figures


# ---- the stage ------------------------------------------------------------------------------------


def rlhf(cfg: RLHFConfig, out: str | Path | None = None, resume: bool = False, *, progress: bool | None = None,
         reward: Scorer | None = None) -> dict:
    """Run (or resume) RLHF into `out` (default `cfg.out_dir`); returns what result.json holds. `reward` replaces
    the reward model of `[reward] model` (any Scorer: a planted one in tests, a rule-based reward)."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise GemmalabError("RLHF runs in one process (CPU or one GPU); launch it without torchrun.")
    if cfg.model.init_from is None:
        raise GemmalabError("RLHF starts from an SFT model: set model.init_from")
    trainer = Trainer(cfg, out if out is not None else cfg.out_dir, "rlhf", resume)
    run, device, rlc = trainer.run, trainer.dist.device, cfg.rlhf
    policy, tokenizer = trainer.build_model()
    if tokenizer is None:
        raise GemmalabError(f"{cfg.model.init_from} has no tokenizer (tokenizer.model)")
    reference, _ = trainer.build_model()  # the frozen SFT model: the KL's other side and the judge's baseline
    reference.requires_grad_(False)
    reference.eval()
    if reward is None:
        scorer = RewardModelScorer.load(cfg.reward.model, device, cfg.data.batch_size)
        if scorer.tokenizer is None or scorer.tokenizer.fingerprint() != tokenizer.fingerprint():
            raise GemmalabError(f"The reward model {cfg.reward.model} does not use the policy's tokenizer "
                                f"({cfg.model.init_from}): train the reward model from the same SFT model.")
        reward = scorer
    train, heldout, judged, counts = _prompts(cfg, tokenizer)
    run.create()
    before = _evaluate_once(run.path / "heldout_before.jsonl", True, policy, tokenizer, heldout, cfg, reward)
    if rlc.algorithm == "ppo":
        add_head(policy, VALUE_HEAD, seed=cfg.train.seed)

    optimizer = build_optimizer(policy, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)
    kl_control = rl.AdaptiveKL(rlc.beta, rlc.kl_target, rlc.kl_horizon)
    guard = GuardState()
    step, elapsed = 0, 0.0
    timings = {"rollout_s": 0.0, "score_s": 0.0, "update_s": 0.0}  # summed over steps
    best_dir = run.path / "best_model"
    if trainer.start is not None:
        state = load_checkpoint(trainer.start, policy, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        step, elapsed, kl_control.beta = int(state["step"]), float(state["elapsed"]), float(state["beta"])
        guard = GuardState(**state["guard"])
        timings = state["timings"]
        log.info("resumed from %s (step %d)", trainer.start, step)
    else:
        _save_policy(policy, tokenizer, best_dir)  # step 0's policy: the SFT model
    run.snapshot(cfg)
    run.trim_metrics(step)
    logger = run.metrics()

    import gemmalab
    from gemmalab.inference import Engine

    policy.train()
    engine = Engine(policy, tokenizer, max_batch_size=cfg.data.batch_size)
    judge = sft_answers = None
    if cfg.guard.judge_every and judged:
        judge = make_judge(cfg.guard.judge, lambda ref: Engine(*gemmalab.load(ref, device=device), max_batch_size=16))
        sft_answers, sft_score = _greedy_answers(Engine(reference, tokenizer, cfg.data.batch_size), judged,
                                                 rlc.max_new_tokens, reward)
        if math.isnan(guard.best_score):
            guard.best_score = sft_score
    faults = FaultInjector(cfg.debug, policy, run.path, True)
    params = [p for p in policy.parameters() if p.requires_grad]
    clip_norm = cfg.optim.grad_clip or math.inf
    stopped_by, status, last = None, "finished", {}
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.dtype == torch.bfloat16
           else contextlib.nullcontext())

    def checkpoint(at: int) -> None:
        save_checkpoint(run.checkpoints, at, policy, optimizer,
                        {"step": at, "elapsed": elapsed, "beta": kl_control.beta, "guard": asdict(guard),
                         "timings": timings,
                         "scheduler": jsonable(scheduler.state_dict()), "world_size": 1}, keep=cfg.checkpoint.keep,
                        after=faults.in_checkpoint(at, lambda: stop.signal is not None))  # `stop`: set below

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.train.steps, initial=step, unit="step", desc="rlhf", dynamic_ncols=True,
               disable=None if progress is None else not progress)
    last_ckpt = step if trainer.start is not None else -1
    try:
        with StopFlag() as stop:
            while step < cfg.train.steps:
                if stop.signal is not None:
                    status = "interrupted"
                    break
                t0 = time.perf_counter()
                faults.start(step + 1)
                figures = _step(policy, reference, reward, engine, train, cfg, step, kl_control.beta, optimizer,
                                params, clip_norm, tokenizer, device, amp)
                scheduler.step()
                step += 1
                if guard.first_length is None:
                    guard.first_length = figures["length"]
                kl_control.update(figures["kl"], rlc.prompts_per_step * rlc.samples_per_prompt)
                for k in timings:
                    timings[k] += figures[k]
                if judge is not None and step % cfg.guard.judge_every == 0:
                    answers, score = _greedy_answers(engine, judged, rlc.max_new_tokens, reward)
                    verdicts = _judge_win_rate(judge, judged, answers, sft_answers)
                    check = guard.check(step, verdicts["win_rate"], score, cfg.guard)
                    figures.update(judge_win_rate=check["win_rate"], judge_score=score)
                    atomic_write(run.path / "guard.jsonl", "".join(json.dumps(c) + "\n" for c in guard.checks))
                    if check["best"]:
                        _save_policy(policy, tokenizer, best_dir)
                    if check["flagged"]:
                        stopped_by = (f"reward hacking: at step {step} the judge's win rate against the SFT model fell "
                                      f"to {check['win_rate']:.3f} from {check['best_win_rate']:.3f} (step "
                                      f"{check['best_step']}) while the reward model's score rose to "
                                      f"{check['score']:.3f} from {check['best_score']:.3f}")
                kl3 = figures["kl_k3"]
                if stopped_by is None and cfg.guard.kl_ceiling is not None and kl3 > cfg.guard.kl_ceiling:
                    stopped_by = f"KL ceiling: the mean KL (k3) {kl3:.3f} exceeds {cfg.guard.kl_ceiling} at step {step}"
                ratio = cfg.guard.max_length_ratio
                if stopped_by is None and ratio is not None and guard.first_length and \
                        figures["length"] > ratio * guard.first_length:
                    stopped_by = (f"length ceiling: mean answer length {figures['length']:.1f} exceeds {ratio} x the "
                                  f"first step's {guard.first_length:.1f} at step {step}")
                dt = time.perf_counter() - t0
                elapsed += dt
                figures.update(beta=kl_control.beta, lr=float(optimizer.param_groups[0]["lr"]), step_time_s=dt)
                last = figures
                if step % cfg.train.log_every == 0 or step == cfg.train.steps or stopped_by or "judge_win_rate" in figures:
                    logger.log(step, figures)
                bar.update(1)
                bar.set_postfix(reward=f"{figures['reward']:.3f}", kl=f"{figures['kl']:.3f}",
                                len=f"{figures['length']:.1f}")
                if stopped_by is not None:
                    log.warning("run stopped by a guard: %s", stopped_by)
                    status = "stopped"
                    break
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                    checkpoint(step)
                    last_ckpt = step
                faults.end(step, lambda: stop.signal is not None)
            if last_ckpt != step and (cfg.checkpoint.at_end or status != "finished"):
                checkpoint(step)
    finally:
        bar.close()
        faults.close()
        logger.close()
    if status == "interrupted":
        log.warning("stopped by signal at step %d; checkpoint written; continue with --resume", step)
        return {"stage": "rlhf", "status": status, "steps": step}

    if stopped_by is not None:  # the best checked policy is the result (the SFT model if no check beat it)
        shutil.rmtree(run.model_dir, ignore_errors=True)
        shutil.copytree(best_dir, run.model_dir)
        from gemmalab.checkpoint import load as load_model

        final, _ = load_model(run.model_dir, dtype=torch.float32, device=device)  # as the policy it replaces
    else:
        _save_policy(policy, tokenizer, run.model_dir)
        final = policy
    after = _evaluate_once(run.path / "heldout_after.jsonl", False, final, tokenizer, heldout, cfg, reward)
    done = max(step, 1)
    figures = {
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "reward_before": before["reward"], "reward_after": after["reward"],
        "length_before": before["length"], "length_after": after["length"],
        "ended_turn_before": before["ended_turn"], "ended_turn_after": after["ended_turn"],
        "accuracy_by_task": {"before": before["by_task"], "after": after["by_task"]}, "heldout": before["n"],
        "kl": last.get("kl"), "kl_k3": last.get("kl_k3"), "beta": kl_control.beta,
        "judge_win_rate": guard.checks[-1]["win_rate"] if guard.checks else None, "guard_checks": guard.checks,
        "best_step": guard.best_step, "stopped_by_guard": stopped_by, "algorithm": rlc.algorithm, "steps": step,
        "seconds": elapsed, "seconds_per_step": {k: v / done for k, v in timings.items()}, "params": cfg.model.config.num_params(), "device": str(device),
        "carbon": carbon(elapsed, cfg.carbon), "model_dir": str(run.model_dir), **counts,
    }
    run.write_result(status, figures)
    return {"stage": "rlhf", "status": status, **figures}


def _save_policy(policy, tokenizer, directory: Path) -> None:
    """The policy as a plain model directory (a value head stripped), replacing what is there."""
    from gemmalab.checkpoint.hf import save_hf
    from gemmalab.model.gemma import Gemma

    trunk, _ = split_head({k: v.detach() for k, v in policy.state_dict().items()}, VALUE_HEAD)
    with torch.device("meta"):
        plain = Gemma(policy.config)
    plain.load_state_dict({k: v.float() for k, v in trunk.items()}, assign=True)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(plain, tmp, tokenizer)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def _step(policy, reference, reward: Scorer, engine, train: list[RLPrompt], cfg: RLHFConfig, step: int, beta: float,
          optimizer, params, clip_norm: float, tokenizer, device, amp) -> dict:
    """One RL step (see the module docstring); returns its figures."""
    rlc, k = cfg.rlhf, cfg.rlhf.samples_per_prompt
    t0 = time.perf_counter()
    r = random.Random(f"{cfg.data.seed}/{step}")
    prompts = [train[i] for i in (r.sample(range(len(train)), rlc.prompts_per_step) if len(train) >= rlc.prompts_per_step
                                  else [r.randrange(len(train)) for _ in range(rlc.prompts_per_step)])]
    ro = _rollouts(engine, prompts, rlc, cfg.data.seed, step, tokenizer.pad_id, tokenizer.end_of_turn_id, device)
    t1 = time.perf_counter()
    ppo = rlc.algorithm == "ppo"
    N = len(ro.responses)
    with torch.no_grad():
        raw = torch.tensor(reward([p.ids for p in ro.prompts], ro.responses), dtype=torch.float32, device=device)
        ended = torch.tensor(ro.ended, device=device)
        scores = _shaped_scores(raw, ended, cfg.reward)
        old, ref_logp = [], []
        for s in range(0, N, rlc.minibatch_size):
            sl = slice(s, s + rlc.minibatch_size)
            with amp:
                old.append(token_logprobs(policy, ro.tokens[sl], ro.attention[sl], ro.response[sl], rlc.temperature,
                                          values=ppo))
                ref_logp.append(token_logprobs(reference, ro.tokens[sl], ro.attention[sl], ro.response[sl],
                                               rlc.temperature)["logp"])
        old = {key: torch.cat([o[key] for o in old]) for key in old[0]}
        ref_logp = torch.cat(ref_logp)
        mask = ro.response
        kl_tok = {e: rl.kl_per_token(old["logp"], ref_logp, e) * mask for e in rl.KL_ESTIMATORS}
        kl_seq = {e: v.sum(-1) for e, v in kl_tok.items()}  # [N]
        if ppo:
            rewards = -beta * kl_tok[rlc.kl_estimator]
            last = mask.long().cumsum(-1).argmax(-1)  # the last response token of each row
            rewards[torch.arange(N, device=device), last] += scores
            advantages, returns = rl.gae(rewards, old["values"], mask, rlc.gamma, rlc.lam)
            advantages = rl.whiten(advantages, mask)
        else:
            total = (scores - beta * kl_seq[rlc.kl_estimator]).view(-1, k)
            advantages = rl.rloo_advantages(total).view(-1)
            if rlc.normalize_advantages:
                advantages = rl.whiten(advantages)
        old_seq = old["logp"].sum(-1)
    t2 = time.perf_counter()

    gen = torch.Generator().manual_seed(zlib.crc32(f"{cfg.train.seed}/minibatch/{step}".encode()))
    losses, clipped, counted, grad_norms, value_losses = [], 0, 0, [], []
    for _ in range(rlc.epochs):
        order = torch.randperm(N, generator=gen).tolist()
        for s in range(0, N, rlc.minibatch_size):
            idx = torch.tensor(order[s:s + rlc.minibatch_size], device=device)
            with amp:
                new = token_logprobs(policy, ro.tokens[idx], ro.attention[idx], mask[idx], rlc.temperature, values=ppo)
            if ppo:
                pg, n_clip = rl.ppo_policy_loss(new["logp"], old["logp"][idx], advantages[idx], mask[idx], rlc.clip)
                vf = rl.ppo_value_loss(new["values"], old["values"][idx], returns[idx], mask[idx], rlc.value_clip)
                n = mask[idx].sum().clamp(min=1)
                loss = (pg + rlc.vf_coef * vf) / n
                value_losses.append(float(vf.detach() / n))
                counted += int(n)
            else:
                pg, n_clip = rl.rloo_loss(new["logp"].sum(-1), old_seq[idx], advantages[idx], rlc.clip)
                loss = pg / len(idx)
                counted += len(idx)
            loss.backward()
            gn = float(torch.nn.utils.clip_grad_norm_(params, clip_norm))
            if math.isfinite(gn) and math.isfinite(float(loss.detach())):
                optimizer.step()
            else:
                log.warning("step %d: non-finite loss or gradient; update skipped", step + 1)
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            grad_norms.append(gn)
            clipped += int(n_clip)
    t3 = time.perf_counter()
    lengths = torch.tensor([len(x) for x in ro.responses], dtype=torch.float32)
    figures = {
        "reward": _mean(scores), "rm_score": _mean(raw), "kl": _mean(kl_seq[rlc.kl_estimator]),
        "kl_k1": _mean(kl_seq["k1"]), "kl_k3": _mean(kl_seq["k3"]),
        "entropy": float(old["entropy"].sum() / mask.sum().clamp(min=1)), "length": _mean(lengths),
        "ended_turn": _mean(ended.float()), "clip_frac": clipped / max(counted, 1), "loss": sum(losses) / len(losses),
        "grad_norm": sum(grad_norms) / len(grad_norms), "rollout_s": t1 - t0, "score_s": t2 - t1, "update_s": t3 - t2,
    }
    if ppo:
        figures["value_loss"] = sum(value_losses) / len(value_losses)
    return figures
