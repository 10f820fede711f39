"""Side-by-side evaluation (`gemmalab sxs`, docs/sxs.md): a test model and a baseline answer the same prompts, a
judge sees both answers in both orders, and the outcomes give wins / ties / losses, the win rate with ties split,
a bootstrap 95% interval, the position-flip rate and a length-controlled win rate, overall and per category.

    OUT/answers.jsonl    one record per (side, prompt): the answer, its token count and why it stopped
    OUT/verdicts.jsonl   one record per (prompt, order): "ab" shows the model's answer first, "ba" the baseline's
    OUT/sxs.meta.json    what the records were made with (a resumed run must match it)
    OUT/sxs.html         every prompt with both answers and both verdicts
    OUT/result.json      stage "sxs": wins, ties, losses, win_rate, ci95, flip_rate, lc_win_rate, by_category, ...

Answers and verdicts are written as they are made, so an interrupted run continues where it stopped and asks no
model or judge again for what it has.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gemmalab.errors import GemmalabError
from gemmalab.evaluate import winrate
from gemmalab.evaluate.judges import HTTPJudge, HTTPJudgeSettings, Judge, LocalJudge, Pairing, ReferenceJudge
from gemmalab.files import read_jsonl, stamp
from gemmalab.runs import RunDir, keep_settings, read_result

__all__ = ["SxSPrompt", "SideConfig", "JudgeConfig", "SxSConfig", "BUILTIN_PROMPTS", "CATEGORIES", "read_prompts",
           "load_prompts", "sxs", "summary_lines", "model_of_run"]

BUILTIN_PROMPTS = Path(__file__).with_name("sxs_prompts.jsonl")
CATEGORIES = ("instruction_following", "factuality", "creativity", "safety", "coding")
ORDERS = ("ab", "ba")  # ab: the model's answer is A; ba: the baseline's is


REFERENCE_JUDGES = ("reference", "reference-exact")


@dataclass(frozen=True)
class SxSPrompt:
    id: str
    prompt: str
    category: str = "general"
    reference: str | None = None  # a known answer: the reference judge needs one, LM judges are shown it


def read_prompts(path: str | Path) -> list[SxSPrompt]:
    """Prompts from JSONL lines `{"prompt", "category"?, "reference"?, "id"?}` (id: the line number if absent); a
    bad line or a repeated id is an error naming the file and line."""
    prompts, seen = [], {}
    for line, obj in read_jsonl(path, required=("prompt",)):
        where = f"{path}, line {line}"
        for key in ("prompt", "category", "reference", "id"):
            if key in obj and obj[key] is not None and not isinstance(obj[key], str if key != "id" else (str, int)):
                raise GemmalabError(f"{where}: `{key}` must be a string, got {type(obj[key]).__name__}.")
        if not obj["prompt"].strip():
            raise GemmalabError(f"{where}: `prompt` is empty.")
        pid = str(obj.get("id", line))
        if pid in seen:
            raise GemmalabError(f"{where}: id {pid!r} was used before, on line {seen[pid]}.")
        seen[pid] = line
        prompts.append(SxSPrompt(pid, obj["prompt"], obj.get("category") or "general", obj.get("reference") or None))
    if not prompts:
        raise GemmalabError(f"{path} holds no prompts.")
    return prompts


@dataclass
class SideConfig:
    """One of the two models compared, and how it answers."""

    model: str = ""  # a model REF, or a stage's run directory (its model/ is used: compare two SFT runs)
    temperature: float = 0.0  # 0 is greedy
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int = 256
    seed: int = 1234  # sampled answers: one seed per prompt, derived from this

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GemmalabError(f"`max_new_tokens` must be >= 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise GemmalabError(f"`temperature` must be >= 0, got {self.temperature}.")


@dataclass
class JudgeConfig:
    """The judge: a model REF (`model`), "reference" (known answers: the answer that states it wins) or
    "reference-exact" (the answer that is it wins), or an OpenAI-compatible API (`url` + `api_model`)."""

    model: str | None = None
    url: str | None = None
    api_model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_tokens: int = 512
    concurrency: int = 4
    requests_per_s: float | None = None
    retries: int = 6
    backoff_s: float = 1.0
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if (self.model is None) == (self.url is None):
            raise GemmalabError("Give exactly one judge: a model (--judge REF, or --judge reference) or an API "
                                "(--judge-url URL --judge-model NAME).")
        if self.url is not None:
            if not self.api_model:
                raise GemmalabError("An API judge needs the model name the server knows: --judge-model NAME.")
            self.http_settings()  # validates

    def http_settings(self) -> HTTPJudgeSettings:
        return HTTPJudgeSettings(self.url, self.api_model, self.api_key_env, self.max_tokens, 0.0, self.timeout_s,
                                 self.retries, self.backoff_s, requests_per_s=self.requests_per_s,
                                 concurrency=self.concurrency)


@dataclass
class SxSConfig:
    model: SideConfig = field(default_factory=SideConfig)
    baseline: SideConfig = field(default_factory=SideConfig)
    judge: JudgeConfig = field(default_factory=lambda: JudgeConfig(model="reference"))
    prompts: str | None = None  # a JSONL file; None: the built-in prompts
    categories: tuple[str, ...] = ()  # only these categories (empty: all)
    limit: int | None = None  # the first N prompts of each category
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    batch_size: int = 16  # prompts answered together
    seed: int = 0  # the bootstrap's

    def __post_init__(self) -> None:
        if not self.model.model or not self.baseline.model:
            raise GemmalabError("Name both models: --model REF --baseline REF.")
        if self.batch_size < 1:
            raise GemmalabError(f"`batch_size` must be >= 1, got {self.batch_size}.")
        if self.limit is not None and self.limit < 1:
            raise GemmalabError(f"`limit` must be >= 1, got {self.limit}.")


def load_prompts(cfg: SxSConfig) -> list[SxSPrompt]:
    """The prompts of a run: the file or the built-in set, only the chosen categories, the first `limit` of each."""
    prompts = read_prompts(cfg.prompts or BUILTIN_PROMPTS)
    if cfg.categories:
        unknown = sorted(set(cfg.categories) - {p.category for p in prompts})
        if unknown:
            raise GemmalabError(f"No prompt has the categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}; "
                                f"the prompts have: {', '.join(sorted({p.category for p in prompts}))}.")
        prompts = [p for p in prompts if p.category in cfg.categories]
    if cfg.limit is not None:
        taken: dict[str, int] = defaultdict(int)
        kept = []
        for p in prompts:
            if taken[p.category] < cfg.limit:
                taken[p.category] += 1
                kept.append(p)
        prompts = kept
    return prompts


def model_of_run(ref: str) -> tuple[str, dict | None]:
    """A model REF as given, or for a stage's run directory (a folder with result.json and model/) its model
    directory and what the run was (stage, directory, its [data] table: which mixture it was tuned on)."""
    path = Path(ref)
    if not (path.is_dir() and (path / "result.json").is_file() and (path / "model").is_dir()):
        return ref, None
    result = read_result(path) or {}
    info = {"run": str(path), "stage": result.get("stage")}
    if (path / "config.toml").is_file():
        from gemmalab.config import read_toml

        info["data"] = read_toml(path / "config.toml").get("data", {})
    return str(path / "model"), info


def _model_identity(ref: str) -> dict:
    """The REF and, for files on disk, a stamp of them (changed weights are another model)."""
    return {"ref": ref, "files": stamp(ref)}


def _side_fingerprint(side: SideConfig, ref: str, cfg: SxSConfig) -> dict:
    return {**_model_identity(ref), **{k: v for k, v in dataclasses.asdict(side).items() if k != "model"},
            "dtype": str(cfg.dtype), "device": cfg.device}


def _prompts_digest(prompts: list[SxSPrompt]) -> str:
    return hashlib.sha256(json.dumps([dataclasses.astuple(p) for p in prompts]).encode()).hexdigest()[:16]


class _Models:
    """Models loaded once per REF and shared by the sides and the judge that name it."""

    def __init__(self, cfg: SxSConfig) -> None:
        self.cfg, self.engines = cfg, {}

    def engine(self, ref: str):
        if ref not in self.engines:
            import gemmalab
            from gemmalab.inference import Engine

            model, tokenizer = gemmalab.load(ref, dtype=self.cfg.dtype, device=self.cfg.device)
            if tokenizer is None:
                raise GemmalabError(f"Model {ref} has no tokenizer (tokenizer.model); add one to the model directory.")
            self.engines[ref] = Engine(model, tokenizer, max_batch_size=self.cfg.batch_size)
        return self.engines[ref]

    def keep_only(self, refs: set[str]) -> None:
        for ref in list(self.engines):
            if ref not in refs:
                del self.engines[ref]
        gc.collect()


def _answer(engine, prompts: list[SxSPrompt], side: SideConfig, side_name: str) -> list[dict]:
    from gemmalab.inference import SamplingParams

    tok, limit = engine.tokenizer, engine.model.config.max_seq_len
    ids, params = [], []
    for p in prompts:
        chat = tok.apply_chat_template([{"role": "user", "content": p.prompt}])
        room = limit - len(chat)
        if room < 1:
            raise GemmalabError(f"Prompt {p.id} ({len(chat)} tokens in the dialogue format) does not fit the "
                                f"{side_name}'s {limit} positions.")
        ids.append(chat)
        params.append(SamplingParams(max_new_tokens=min(side.max_new_tokens, room), temperature=side.temperature,
                                     top_p=side.top_p, top_k=side.top_k,
                                     seed=zlib.crc32(f"{side.seed}/{side_name}/{p.id}".encode())))
    completions = engine.generate(ids, params)
    return [{"key": f"{side_name}/{p.id}", "side": side_name, "id": p.id, "answer": c.text.strip(),
             "tokens": len(c.ids), "finish_reason": c.finish_reason,
             "ended_turn": c.stop_id == tok.end_of_turn_id} for p, c in zip(prompts, completions)]


def make_judge(cfg: JudgeConfig, engine_of: Callable[[str], Any]) -> Judge:
    """The judge `cfg` names; `engine_of(ref)` gives the inference engine of a model REF (a local judge)."""
    if cfg.url is not None:
        return HTTPJudge(cfg.http_settings())
    if cfg.model in REFERENCE_JUDGES:
        return ReferenceJudge(exact=cfg.model == "reference-exact")
    ref, _ = model_of_run(cfg.model)
    return LocalJudge(engine_of(ref), ref)


def sxs(cfg: SxSConfig, out: str | Path, progress: bool = True, judge: Judge | None = None) -> dict:
    """Run the side-by-side evaluation into run directory `out` (resuming what it holds) and return result.json.

    `judge` replaces the configured one (any object with `describe()` and `judge(pairings)`, see judges.py)."""
    started = time.perf_counter()
    prompts = load_prompts(cfg)
    if judge is None and cfg.judge.model in REFERENCE_JUDGES:
        judged = [p for p in prompts if p.reference]
        if not judged:
            raise GemmalabError("The reference judge needs prompts with a `reference`; none of these has one.")
    else:
        judged = prompts
    refs = {name: model_of_run(getattr(cfg, name).model) for name in ("model", "baseline")}
    judge_ref = None if cfg.judge.model in (None, *REFERENCE_JUDGES) else model_of_run(cfg.judge.model)[0]
    run = RunDir(out, "sxs")
    meta = {"prompts": _prompts_digest(judged),
            **{name: _side_fingerprint(getattr(cfg, name), refs[name][0], cfg) for name in refs},
            "judge": (judge.describe() if judge is not None
                      else {"kind": "http", "url": cfg.judge.url, "model": cfg.judge.api_model,
                            "max_tokens": cfg.judge.max_tokens} if cfg.judge.url
                      else ReferenceJudge(cfg.judge.model == "reference-exact").describe() if judge_ref is None else {"kind": "local", **_model_identity(judge_ref)})}
    # answers and verdicts made with other settings are never mixed into this run
    keep_settings(run.path / "sxs.meta.json", meta, [run.path / "answers.jsonl", run.path / "verdicts.jsonl"],
                  f"{run.path} holds a side-by-side run")
    run.snapshot(cfg)
    models = _Models(cfg)
    timings = {}  # seconds spent in this invocation (a resumed run counts only what it did)

    with run.records("answers", key="key") as answers:
        for name in ("model", "baseline"):
            pending = [p for p in judged if f"{name}/{p.id}" not in answers.done]
            if not pending:
                continue
            phase = time.perf_counter()
            engine = models.engine(refs[name][0])
            bar = tqdm(total=len(judged), initial=len(judged) - len(pending), desc=f"{name} answers", unit="prompt",
                       disable=not progress, dynamic_ncols=True)
            pending.sort(key=lambda p: len(p.prompt), reverse=True)  # similar lengths batch together
            for start in range(0, len(pending), cfg.batch_size):
                chunk = pending[start:start + cfg.batch_size]
                answers.append(_answer(engine, chunk, getattr(cfg, name), name))
                bar.update(len(chunk))
            bar.close()
            timings[f"{name}_answers_s"] = round(time.perf_counter() - phase, 1)
        answer = dict(answers.done)
    models.keep_only({judge_ref} if judge_ref and judge is None else set())

    phase = time.perf_counter()
    judge = judge or make_judge(cfg.judge, models.engine)
    with run.records("verdicts", key="key") as verdicts:
        pending = [(p, order) for p in judged for order in ORDERS if f"{p.id}/{order}" not in verdicts.done]
        bar = tqdm(total=2 * len(judged), initial=2 * len(judged) - len(pending), desc="verdicts", unit="verdict",
                   disable=not progress or not pending, dynamic_ncols=True)
        step = max(1, cfg.batch_size)
        for start in range(0, len(pending), step):
            chunk = pending[start:start + step]
            pairings = []
            for p, order in chunk:
                mine, theirs = answer[f"model/{p.id}"]["answer"], answer[f"baseline/{p.id}"]["answer"]
                a, b = (mine, theirs) if order == "ab" else (theirs, mine)
                pairings.append(Pairing(p.prompt, a, b, p.reference))
            got = judge.judge(pairings)
            verdicts.append({"key": f"{p.id}/{order}", "id": p.id, "order": order, **v.record()}
                            for (p, order), v in zip(chunk, got))
            bar.update(len(chunk))
        bar.close()
        verdict = dict(verdicts.done)
    if pending:
        timings["verdicts_s"] = round(time.perf_counter() - phase, 1)

    rows = []
    for p in judged:
        seen = [in_model_terms(verdict[f"{p.id}/{order}"]["choice"], order) for order in ORDERS]
        mine, theirs = answer[f"model/{p.id}"], answer[f"baseline/{p.id}"]
        rows.append({"prompt": p, "verdicts": [verdict[f"{p.id}/{o}"] for o in ORDERS], "seen": seen,
                     "outcome": winrate.combine(*seen), "flip": seen[0] != seen[1],
                     "length_delta": len(mine["answer"]) - len(theirs["answer"]), "model": mine, "baseline": theirs})
    result = _figures(rows, cfg.seed)
    calibrated = [r for r in rows if all(v.get("probs") for v in r["verdicts"])]
    if calibrated:  # a local judge: its probabilities averaged over both seats
        result["calibrated"] = _figures([{**r, "outcome": _calibrated(r["verdicts"])} for r in calibrated], cfg.seed)
        del result["calibrated"]["flip_rate"]  # one outcome from both seats: nothing can flip
    by_category = defaultdict(list)
    for r in rows:
        by_category[r["prompt"].category].append(r)
    result["by_category"] = {c: _figures(rs, cfg.seed) for c, rs in sorted(by_category.items())}
    unparsed = sum(not v.get("parsed", True) for v in verdict.values())
    lo, hi = result["ci95"]
    result.update({
        "model": cfg.model.model, "baseline": cfg.baseline.model, "judge": meta["judge"],
        "runs": {name: info for name, (_, info) in refs.items() if info is not None},
        "prompts": len(prompts), "judged": len(judged), "skipped_no_reference": len(prompts) - len(judged),
        "unparsed_verdicts": unparsed,
        "ended_turn": {name: sum(answer[f"{name}/{p.id}"]["ended_turn"] for p in judged) / len(judged)
                       for name in ("model", "baseline")},
        "mean_answer_chars": {name: sum(len(answer[f"{name}/{p.id}"]["answer"]) for p in judged) / len(judged)
                              for name in ("model", "baseline")},
        "winner": "model" if lo > 0.5 else "baseline" if hi < 0.5 else "neither (the interval holds 50%)",
        "margin": result["win_rate"] - 0.5,
        "seconds": round(time.perf_counter() - started, 1), "timings": timings, "page": "sxs.html",
    })
    if getattr(judge, "retried", 0):
        result["judge_retries"] = judge.retried
    from gemmalab.evaluate.sxs_page import write_page

    write_page(run.path / "sxs.html", result, rows)
    return run.write_result("finished", result)


def in_model_terms(choice: str, order: str) -> str:
    """A judge's "A" / "B" / "tie" as which side it preferred."""
    if choice == "tie":
        return winrate.TIE
    model_first = order == "ab"
    return winrate.MODEL if (choice == "A") == model_first else winrate.BASELINE


def _calibrated(verdicts: list[dict]) -> str:
    """The outcome of a prompt from a judge's probabilities, each side's averaged over the two seats it sat in
    (balanced position calibration, Wang et al. 2023): a judge that favours a seat favours both sides equally."""
    ab, ba = verdicts[0]["probs"], verdicts[1]["probs"]
    mine, theirs = ab["A"] + ba["B"], ab["B"] + ba["A"]
    return winrate.MODEL if mine > theirs else winrate.BASELINE if theirs > mine else winrate.TIE


def _figures(rows: list[dict], seed: int) -> dict:
    figures = winrate.summarize([r["outcome"] for r in rows], [r["flip"] for r in rows],
                                [r["length_delta"] for r in rows], seed)
    return {k: (round(v, 6) if isinstance(v, float) else [round(x, 6) for x in v] if isinstance(v, list) else v)
            for k, v in figures.items()}


def summary_lines(result: dict) -> list[str]:
    """The result as a terminal table: one row per category and one for all prompts, then the winner."""
    head = f"{'category':<24}{'n':>5}{'W':>5}{'T':>5}{'L':>5}  {'win rate':>8}  {'95% CI':<15}{'flip':>6}{'LC':>7}"
    lines = [head, "-" * len(head)]

    def row(name: str, f: dict) -> str:
        ci = f"[{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}]"
        flip = f"{f['flip_rate']:.2f}" if "flip_rate" in f else "-"
        return (f"{name:<24}{f['n']:>5}{f['wins']:>5}{f['ties']:>5}{f['losses']:>5}  {f['win_rate']:>8.3f}  "
                f"{ci:<15}{flip:>6}{f['lc_win_rate']:>7.3f}")

    lines += [row(c, f) for c, f in result["by_category"].items()]
    lines += ["-" * len(head), row("all", result)]
    if "calibrated" in result:
        lines.append(row("all, seat-calibrated", result["calibrated"]))
    verdict = {"model": f"{result['model']} wins", "baseline": f"{result['baseline']} (the baseline) wins"}.get(
        result["winner"], "no clear winner: the interval holds 50%")
    lines.append(f"{verdict}: win rate {result['win_rate']:.3f} ({100 * result['margin']:+.1f} points over even), "
                 f"judged by {result['judge'].get('model') or result['judge'].get('ref') or result['judge']['kind']}")
    if result.get("unparsed_verdicts"):
        lines.append(f"{result['unparsed_verdicts']} verdicts held no [[A]]/[[B]]/[[C]] and were counted as ties.")
    return lines
