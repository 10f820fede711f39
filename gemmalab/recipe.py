"""The whole Gemma recipe from one file: data -> pretraining -> SFT -> reward model -> RLHF -> benchmarks ->
side by side -> memorization audit, each stage through its own code and config, into OUT/<stage>/.

    cfg = gemmalab.config.load(RecipeConfig, "configs/recipes/tiny.toml")
    result = recipe(cfg, "runs/tiny-recipe")         # OUT/result.json: each stage's status, time and headline

A recipe file names, per stage, the stage's own TOML (`config`, the file its command takes) and `set` overrides
(`key=value`, as on the command line). The recipe only orders the stages and wires their paths (the pretraining
data is OUT/data's token shards, SFT starts from OUT/pretrain/model, and so on: `_wiring`), applied after the
stage's file and before `set`. A stage whose result.json says it finished is skipped on a rerun; an interrupted
one resumes; a failing one stops the recipe with its name in the message.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gemmalab.errors import GemmalabError
from gemmalab.files import atomic_write
from gemmalab.runs import read_result

__all__ = ["STAGES", "StageSpec", "EvalSpec", "SxSSpec", "RecipeConfig", "recipe", "stage_dirs", "plan", "plan_lines"]

log = logging.getLogger(__name__)

STAGES = ("data", "pretrain", "sft", "reward", "rlhf", "eval", "sxs", "memorization")
MODEL_STAGES = ("pretrain", "sft", "rlhf")  # the models the benchmarks and the side-by-side compare
DONE = ("finished", "stopped")
MAX_NEW_TOKENS = 32  # answers to the built-in checkable prompts (the side-by-side's default prompts)  # "stopped": an RLHF run ended by a guard (its best policy is its model)


@dataclass
class StageSpec:
    """`[<stage>]` of a recipe: the stage's own config file and overrides on top of the recipe's wiring."""

    config: str | None = None  # the stage's TOML (e.g. configs/sft/tiny.toml); None: the stage's defaults
    set: list[str] = field(default_factory=list)  # key=value overrides, last
    enabled: bool = True


@dataclass
class EvalSpec:
    """`[eval]`: offline benchmarks of the recipe's models (gemmalab.evaluate; docs/evaluate.md)."""

    tasks: list[str] = field(default_factory=lambda: ["checkable", "humaneval"])
    models: list[str] = field(default_factory=lambda: list(MODEL_STAGES))
    data_dir: str | None = None  # local task files (MMLU, GSM8K, ...), as `gemmalab eval --data-dir`
    limit: int | None = None
    allow_code_execution: bool = True  # HumanEval and MBPP run the models' code in the bubblewrap sandbox
    batch_size: int = 16
    enabled: bool = True

    def __post_init__(self) -> None:
        bad = sorted(set(self.models) - set(MODEL_STAGES))
        if bad:
            raise GemmalabError(f"`eval.models` must name some of {', '.join(MODEL_STAGES)}, got {', '.join(bad)}")
        if self.limit is not None and self.limit < 1:
            raise GemmalabError(f"`eval.limit` must be >= 1, got {self.limit}")


@dataclass
class SxSSpec:
    """`[sxs]`: side-by-side comparisons (model, baseline) of the recipe's models (gemmalab.evaluate.sxs). Without
    `prompts` in `set`, they answer the held-out checkable prompts of the SFT run, judged against the known answers
    (`judge.model = "reference-exact"` unless set): the held-out accuracy as a win rate. Set `judge.model` (a
    stronger model) and `prompts` for open-ended prompts."""

    pairs: list[list[str]] = field(default_factory=lambda: [["rlhf", "sft"], ["sft", "pretrain"]])
    config: str | None = None  # an SxS TOML (the fields of gemmalab.evaluate.sxs.SxSConfig)
    set: list[str] = field(default_factory=list)
    enabled: bool = True

    def __post_init__(self) -> None:
        for pair in self.pairs:
            if len(pair) != 2 or set(pair) - set(MODEL_STAGES) or pair[0] == pair[1]:
                raise GemmalabError(f"`sxs.pairs` holds [model, baseline] pairs of two of {', '.join(MODEL_STAGES)}, "
                                    f"got {pair}")


@dataclass
class RecipeConfig:
    """A recipe (configs/recipes/*.toml): one table per stage, run in the order of STAGES."""

    out_dir: str = "runs/recipe"
    data: StageSpec = field(default_factory=StageSpec)
    pretrain: StageSpec = field(default_factory=StageSpec)
    sft: StageSpec = field(default_factory=StageSpec)
    reward: StageSpec = field(default_factory=StageSpec)
    rlhf: StageSpec = field(default_factory=StageSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    sxs: SxSSpec = field(default_factory=SxSSpec)
    memorization: StageSpec = field(default_factory=StageSpec)

    def __post_init__(self) -> None:
        on = [s for s in STAGES if getattr(self, s).enabled]
        needs = {"pretrain": ["data"], "sft": ["pretrain"], "reward": ["sft"], "rlhf": ["sft", "reward"],
                 "memorization": ["data", "pretrain"], "eval": self.eval.models,
                 "sxs": sorted({m for p in self.sxs.pairs for m in p})}
        for stage in on:
            missing = [n for n in needs.get(stage, []) if n not in on]
            if missing:
                raise GemmalabError(f"stage `{stage}` needs {', '.join(missing)}, which this recipe turns off")


def stage_dirs(out: str | Path) -> dict[str, Path]:
    """Where each stage writes, under the recipe's run directory."""
    out = Path(out)
    return {s: out / s for s in STAGES}


def _quoted(path: Path) -> str:
    return json.dumps(str(path))  # a TOML basic string


def _wiring(stage: str, d: dict[str, Path]) -> list[str]:
    """The overrides that connect `stage` to the stages before it (paths only)."""
    model = {s: _quoted(d[s] / "model") for s in MODEL_STAGES + ("reward",)}
    return {
        "pretrain": [f"data.shards=[{_quoted(d['data'] / 'tokens')}]",
                     f"data.tokenizer={_quoted(d['data'] / 'tokenizer' / 'tokenizer.model')}"],
        "sft": [f"model.init_from={model['pretrain']}"],
        "reward": [f"model.init_from={model['sft']}"],
        "rlhf": [f"model.init_from={model['sft']}", f"reward.model={model['reward']}"],
        "memorization": [f"model={model['pretrain']}", f"corpus={_quoted(d['data'] / 'tokens')}"],
    }.get(stage, [])


def _status(run: Path) -> str | None:
    try:
        result = read_result(run)
    except GemmalabError:
        return None  # a broken result.json: the stage runs again
    return None if result is None else result.get("status")


def _headline(result: dict, keys: tuple[str, ...]) -> dict:
    return {k: result[k] for k in keys if k in result}


HEADLINES = {
    "data": ("documents_in", "documents_out", "tokens", "vocab_size"),
    "pretrain": ("steps", "final_loss", "tokens", "mfu"),
    "sft": ("accuracy_before", "accuracy_after", "heldout_loss_before", "heldout_loss_after"),
    "reward": ("heldout_accuracy_before", "heldout_accuracy"),
    "rlhf": ("accuracy_before", "accuracy_after", "reward_before", "reward_after", "kl", "judge_win_rate",
             "stopped_by_guard"),
    "memorization": ("samples",),
}


def recipe(cfg: RecipeConfig, out: str | Path | None = None, *, progress: bool = True,
           on_stage: Callable[[str, str], None] | None = None) -> dict:
    """Run (or continue) the recipe into `out` (default `cfg.out_dir`), then write its report (OUT/report.html,
    OUT/MODEL_CARD.md); returns what OUT/result.json holds. `on_stage(stage, what)` hears "skipped", "running" and
    the stage's end status."""
    out = Path(out if out is not None else cfg.out_dir)
    d = stage_dirs(out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "result.json"
    try:
        stages: dict[str, dict] = (read_result(out) or {}).get("stages", {})
    except GemmalabError:
        stages = {}
    started = time.perf_counter()
    for stage in STAGES:
        if not getattr(cfg, stage).enabled:
            stages[stage] = {"status": "off"}
            continue
        runner = _RUNNERS[stage]
        status = runner.done(d[stage], cfg)
        if status in DONE:
            if on_stage:
                on_stage(stage, "skipped")
            stages.setdefault(stage, {"status": status})
            continue
        if on_stage:
            on_stage(stage, "running")
        t0 = time.perf_counter()
        try:
            result = runner.run(cfg, d, progress)
        except GemmalabError as e:
            _write_summary(summary_path, out, "failed", {**stages, stage: {"status": "failed", "error": str(e)}})
            raise GemmalabError(f"recipe stage `{stage}` failed ({d[stage]}): {e}") from e
        except Exception as e:
            _write_summary(summary_path, out, "failed", {**stages, stage: {"status": "failed", "error": repr(e)}})
            raise RuntimeError(f"recipe stage `{stage}` failed ({d[stage]}): {e!r}") from e
        stages[stage] = {"status": result.get("status", "finished"), "seconds": round(time.perf_counter() - t0, 1),
                         **result.get("headline", {})}
        if on_stage:
            on_stage(stage, stages[stage]["status"])
        if stages[stage]["status"] not in DONE:  # interrupted: the rerun resumes here
            _write_summary(summary_path, out, "interrupted", stages)
            return {"stage": "recipe", "status": "interrupted", "stages": stages}
    from gemmalab.report import REPORT_FILES, write_report

    _write_summary(summary_path, out, "finished", stages, seconds=time.perf_counter() - started,
                   report={k: str(out / name) for k, name in REPORT_FILES.items()})
    write_report(out)  # reads the summary just written
    return read_result(out)


def _write_summary(path: Path, out: Path, status: str, stages: dict, seconds: float | None = None,
                   report: dict | None = None) -> None:
    body = {"stage": "recipe", "status": status, "out_dir": str(out), "stages": stages}
    if seconds is not None:
        body["seconds_this_run"] = round(seconds, 1)
    if report is not None:
        body["report"] = report  # OUT/report.html and OUT/MODEL_CARD.md
    atomic_write(path, json.dumps(body, indent=1, default=str) + "\n")


# ---- the stages -----------------------------------------------------------------------------------------


def _load(cls, spec: StageSpec, wiring: list[str]):
    from gemmalab.config import load

    return load(cls, spec.config, wiring + list(spec.set))


@dataclass(frozen=True)
class _Runner:
    run: Callable[[RecipeConfig, dict[str, Path], bool], dict]
    done: Callable[[Path, RecipeConfig], str | None] = lambda run, cfg: _status(run)


def _data(cfg: RecipeConfig, d: dict[str, Path], progress: bool) -> dict:
    from gemmalab.data.config import DataConfig
    from gemmalab.data.pipeline import prepare

    prepare(_load(DataConfig, cfg.data, []), d["data"])
    result = read_result(d["data"]) or {}
    return {"status": result.get("status"), "headline": _headline(result, HEADLINES["data"])}


# the training stages: their module (with the stage function of the same name) and config class
TRAINING = {"pretrain": ("gemmalab.train.pretrain", "PretrainConfig"), "sft": ("gemmalab.train.sft", "SFTConfig"),
            "reward": ("gemmalab.train.reward", "RewardConfig"), "rlhf": ("gemmalab.train.rlhf", "RLHFConfig")}


def _stage_config(stage: str, cfg: RecipeConfig, d: dict[str, Path]):
    """(the stage's module, its config: the stage's file, the recipe's wiring, then `set`)."""
    import importlib

    module, name = TRAINING[stage]
    mod = importlib.import_module(module)
    return mod, _load(getattr(mod, name), getattr(cfg, stage), _wiring(stage, d))


def _training(stage: str) -> Callable:
    def run(cfg: RecipeConfig, d: dict[str, Path], progress: bool) -> dict:
        mod, stage_cfg = _stage_config(stage, cfg, d)
        # resume=True: from the newest checkpoint if there is one, else from the start (as `--resume` does)
        result = getattr(mod, stage)(stage_cfg, d[stage], resume=True, progress=progress)
        return {"status": result["status"], "headline": _headline(result, HEADLINES[stage])}

    return run


def _eval(cfg: RecipeConfig, d: dict[str, Path], progress: bool) -> dict:
    """Each model on each task that fits its context; a task that does not (HumanEval's 1,024 new tokens on a
    256-position tiny model) is recorded as skipped, with the reason."""
    import gemmalab
    from gemmalab.evaluate import evaluate, load_task
    from gemmalab.evaluate.harness import model_identity
    from gemmalab.evaluate.tasks.checkable import load_checkable
    from gemmalab.inference import Engine

    spec = cfg.eval
    builtin = _sft_builtin(d)
    tasks = [load_checkable(builtin.heldout, builtin.seed, builtin.tasks) if n == "checkable" and builtin is not None
             else load_task(n, Path(spec.data_dir) if spec.data_dir else None) for n in spec.tasks]
    models = {}
    for name in spec.models:
        model, tokenizer = gemmalab.load(d[name] / "model", dtype="fp32")  # as the stages computed their figures
        fits, skipped = [], {}
        for task in tasks:
            samples = task.samples[:spec.limit] if spec.limit is not None else task.samples
            need = max((len(tokenizer.encode(s.prompt)) for s in samples), default=0) + task.max_new_tokens
            if need > model.config.max_seq_len:
                skipped[task.name] = (f"needs {need} positions (longest prompt + {task.max_new_tokens} new tokens), "
                                      f"the model has {model.config.max_seq_len}")
            else:
                fits.append(task)
        result = {}
        if fits:
            result = evaluate(Engine(model, tokenizer, max_batch_size=spec.batch_size), fits, d["eval"] / name,
                              model=str(d[name] / "model"), limit=spec.limit,
                              allow_code_execution=spec.allow_code_execution, progress=progress,
                              model_identity=model_identity(d[name] / "model", next(model.parameters()).dtype, None))
        models[name] = {"headline": result.get("headline", {}), "skipped": skipped}
    atomic_write(d["eval"] / "result.json", json.dumps({"stage": "eval", "status": "finished", "models": models},
                                                       indent=1) + "\n")
    return {"status": "finished", "headline": {"models": models}}


def _sft_builtin(d: dict[str, Path]):
    """The SFT run's built-in tasks and split (BuiltinTasks), or None: the held-out prompts the recipe evaluates."""
    from gemmalab.config import load
    from gemmalab.train.sft import SFTConfig

    return load(SFTConfig, d["sft"] / "config.toml").data.builtin


def _heldout_prompts(d: dict[str, Path]) -> Path:
    """The SFT run's held-out checkable prompts with their answers, as side-by-side prompts (OUT/sxs/prompts.jsonl)."""
    from gemmalab.data.instruct import builtin_dialogues

    path = d["sxs"] / "prompts.jsonl"
    if not path.is_file():
        builtin = _sft_builtin(d)
        if builtin is None:
            raise GemmalabError("the SFT run has no built-in held-out tasks: give `[sxs] set` a `prompts` file "
                                "and a `judge.model`")
        _, heldout = builtin_dialogues(builtin)
        lines = [{"id": f"{e['task']}:{i}", "prompt": e["prompt"], "category": e["task"], "reference": e["answer"]}
                 for i, e in enumerate(heldout)]
        d["sxs"].mkdir(parents=True, exist_ok=True)
        atomic_write(path, "".join(json.dumps(x) + "\n" for x in lines))
    return path


def _sxs_done(run: Path, cfg: RecipeConfig) -> str | None:
    statuses = [_status(run / f"{a}-vs-{b}") for a, b in cfg.sxs.pairs]
    return "finished" if statuses and all(s in DONE for s in statuses) else None


def _sxs(cfg: RecipeConfig, d: dict[str, Path], progress: bool) -> dict:
    from gemmalab.evaluate.sxs import SxSConfig, sxs

    spec, headline = cfg.sxs, {}
    has_prompts = any(s.split("=", 1)[0].strip() == "prompts" for s in spec.set)
    has_judge = any(s.split("=", 1)[0].strip().startswith("judge") for s in spec.set)
    short = [f"{side}.max_new_tokens={MAX_NEW_TOKENS}" for side in ("model", "baseline")]  # the answers are short
    base = ([] if has_prompts else [f"prompts={_quoted(_heldout_prompts(d))}", *short]) + \
        ([] if has_judge else ['judge.model="reference-exact"'])
    for a, b in spec.pairs:
        wiring = base + [f"model.model={_quoted(d[a] / 'model')}", f"baseline.model={_quoted(d[b] / 'model')}"]
        result = sxs(_load(SxSConfig, StageSpec(spec.config, spec.set), wiring), d["sxs"] / f"{a}-vs-{b}",
                     progress=progress)
        headline[f"{a}-vs-{b}"] = {k: result.get(k) for k in ("win_rate", "ci95", "wins", "ties", "losses", "judge")}
    atomic_write(d["sxs"] / "result.json", json.dumps({"stage": "sxs", "status": "finished", "pairs": headline},
                                                      indent=1) + "\n")
    return {"status": "finished", "headline": {"pairs": headline}}


def _memorization(cfg: RecipeConfig, d: dict[str, Path], progress: bool) -> dict:
    from gemmalab.evaluate.memorization import MemorizationConfig, memorization

    result = memorization(_load(MemorizationConfig, cfg.memorization, _wiring("memorization", d)), d["memorization"],
                          progress=progress)
    sources = {name: {k: s.get(k) for k in ("samples", "exact_rate", "approx_rate")}
               for name, s in result.get("sources", {}).items()}
    return {"status": result.get("status", "finished"), "headline": {"sources": sources}}


_RUNNERS = {
    "data": _Runner(_data),
    "pretrain": _Runner(_training("pretrain")),
    "sft": _Runner(_training("sft")),
    "reward": _Runner(_training("reward")),
    "rlhf": _Runner(_training("rlhf")),
    "eval": _Runner(_eval),
    "sxs": _Runner(_sxs, _sxs_done),
    "memorization": _Runner(_memorization),
}


# ---- the plan (a dry run) -------------------------------------------------------------------------------


def plan(cfg: RecipeConfig, world_size: int = 8, peak_tflops: float = 989.0, mfu: float = 0.4) -> dict:
    """What the recipe would run, computed without data, weights or devices: per training stage its parameters,
    memory per device and tokens (gemmalab.train.pretrain.plan), its FLOPs (6 N per trained token; RLHF per
    sample: generation 2 N, the policy's, the reference's and the reward model's scoring 6 N, the update 6 N per
    epoch, per token), the time at `mfu` of `peak_tflops` per device (bf16 dense; 989 is an H100 SXM's) and the
    carbon of that time (the stage's `[carbon]` power, PUE and grid). RLHF runs on one device."""
    import tempfile

    import torch

    from gemmalab.checkpoint.hf import to_hf_config
    from gemmalab.files import write_json
    from gemmalab.train.metrics import CarbonConfig, carbon
    from gemmalab.train.pretrain import plan as train_plan

    if world_size < 1 or not peak_tflops > 0 or not 0 < mfu <= 1:
        raise GemmalabError("need world_size >= 1, peak_tflops > 0 and 0 < mfu <= 1")
    stages: dict[str, dict] = {"data": {"config": cfg.data.config, "set": cfg.data.set}} if cfg.data.enabled else {}
    with tempfile.TemporaryDirectory() as tmp:
        d = stage_dirs(tmp)
        configs = {}
        for stage in TRAINING:
            if not getattr(cfg, stage).enabled:
                continue
            configs[stage] = _stage_config(stage, cfg, d)[1]
            if stage in ("pretrain", "sft", "reward"):  # what the next stages start from: a model of this shape
                (d[stage] / "model").mkdir(parents=True)
                write_json(d[stage] / "model" / "config.json", to_hf_config(configs[stage].model.config))
        for stage, c in configs.items():
            devices = 1 if stage == "rlhf" else world_size
            n = c.model.config.num_params()
            if stage == "rlhf":
                r = c.rlhf
                rows = r.prompts_per_step * r.samples_per_prompt
                tokens = rows * c.data.seq_len * c.train.steps  # prompt + answer positions, at most
                flops = (2 + 6 + 6 * r.epochs) * n * tokens
                frozen = 2 if c.train.dtype == torch.bfloat16 else 4  # the reference and the reward model
                p = {"model": c.model.init_from, "parameters": n, "world_size": 1, "samples_per_step": rows,
                     "steps": c.train.steps, "total_tokens": tokens,
                     # at least: the policy's fp32 weights, gradients and AdamW moments, and the two frozen models
                     "memory_per_device_gib": {"total": n * (16 + 2 * frozen) / 2**30, "lower_bound": True}}
            else:
                p = train_plan(c, devices)
                tokens = p["total_tokens"] * (2 if stage == "reward" else 1)  # a reward step scores two answers per pair
                flops = 6 * n * tokens
            seconds = flops / (devices * peak_tflops * 1e12 * mfu)
            site = CarbonConfig(c.carbon.device_power_watts, devices, c.carbon.pue, c.carbon.grid_kg_co2e_per_kwh)
            stages[stage] = {**p, "flops": flops, "seconds": seconds, "carbon": carbon(seconds, site)}
    return {"world_size": world_size, "peak_tflops": peak_tflops, "mfu": mfu, "stages": stages,
            "seconds": sum(s.get("seconds", 0.0) for s in stages.values()),
            "co2e_kg": sum(s["carbon"]["co2e_kg"] for s in stages.values() if "carbon" in s)}


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f}"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h ({seconds / 86400:,.1f} days)" if seconds >= 3600 else f"{seconds:,.1f} s"


def plan_lines(p: dict) -> list[str]:
    """The plan as the terminal shows it."""
    lines = [f"plan on {p['world_size']} device(s) at {p['mfu']:.0%} of {p['peak_tflops']:g} TFLOP/s each "
             f"(estimates)"]
    for stage, s in p["stages"].items():
        if "flops" not in s:
            lines.append(f"{stage:<10} {s.get('config')} {' '.join(s.get('set', []))}")
            continue
        mem = s.get("memory_per_device_gib", {}).get("total")
        lines.append(f"{stage:<10} {_si(s['parameters'])} parameters on {s['world_size']} device(s), "
                     f"{s['steps']:,} steps, {_si(s['total_tokens'])} tokens, {s['flops']:.2e} FLOPs"
                     + (f", {'>= ' if s['memory_per_device_gib'].get('lower_bound') else ''}{mem:.1f} GiB per device"
                        if mem is not None else "")
                     + f", {_hours(s['seconds'])}, {s['carbon']['co2e_kg']:,.3g} kg CO2e")
    lines.append(f"total      {_hours(p['seconds'])} of training, {p['co2e_kg']:,.3g} kg CO2e "
                 f"(benchmarks, side by side and the audit not counted)")
    return lines
