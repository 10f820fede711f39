"""Supervised fine-tuning: dialogues in the Gemma format, filtered, on the shared loop; full or LoRA.

    cfg = gemmalab.config.load(SFTConfig, "configs/sft/tiny.toml")
    result = sft(cfg, "runs/tiny/sft")        # what result.json holds

The stage reads dialogue JSONL files and/or the built-in checkable tasks (gemmalab.data.instruct), filters them
(gemmalab.data.sft_filters), renders them with loss masks and packs them (gemmalab.data.dialogue), and trains the
next-token loss on the model's turns, starting from `[model] init_from`. With `[lora]` only adapters train; the
exported model has them merged and OUT/adapter/ holds them alone. Before and after training it measures the
held-out set: exact-match accuracy of greedy answers (through the inference engine) and the loss on the answers.

Run directory: config.toml, metrics.jsonl, checkpoints/, model/, adapter/ (LoRA), heldout_before.jsonl and
heldout_after.jsonl (every held-out answer), result.json (stage "sft": accuracy_before, accuracy_after,
heldout_loss_before, heldout_loss_after, the filter and rendering counts, and the loop's figures).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gemmalab.data.dialogue import DialogueBatches, Example, pack_rows, read_dialogues, render, rows_batch
from gemmalab.data.instruct import BuiltinTasks, builtin_dialogues, is_correct
from gemmalab.data.sft_filters import SFTFilterConfig, filter_dialogues
from gemmalab.errors import GemmalabError
from gemmalab.files import atomic_write, read_jsonl
from gemmalab.runs import RunDir
from gemmalab.train.config import CheckpointSection, DebugSection, ModelSpec, TrainSection, resolve_run
from gemmalab.train.lora import LoRAConfig, apply_lora, merge, save_adapter
from gemmalab.train.loop import Trainer
from gemmalab.train.metrics import CarbonConfig
from gemmalab.train.optim import OptimConfig
from gemmalab.train.pretrain import NextTokenObjective

__all__ = ["SFTData", "HeldoutSection", "SFTConfig", "HeldoutItem", "sft", "heldout_figures"]


@dataclass
class SFTData:
    """`[data]`: where the dialogues come from, how they are filtered and batched."""

    train: list[str] = field(default_factory=list)  # dialogue JSONL files (gemmalab.data.dialogue formats)
    heldout: list[str] = field(default_factory=list)  # held-out dialogue files: the last model turn is the answer
    builtin: BuiltinTasks | None = None  # [data.builtin]: generated checkable tasks, train and held-out
    tokenizer: str | None = None  # a tokenizer.model or model REF; None: init_from's
    batch_size: int = 8  # rows per process per micro-batch
    seq_len: int = 256  # positions per row; a dialogue longer than seq_len + 1 tokens is dropped
    packing: bool = True  # several dialogues per row (document-masked), else one
    seed: int = 0  # dialogue order per epoch
    filters: SFTFilterConfig = field(default_factory=SFTFilterConfig)

    def __post_init__(self) -> None:
        if not self.train and self.builtin is None:
            raise GemmalabError("no training dialogues: give `train` files or a [data.builtin] table")
        if self.batch_size < 1 or self.seq_len < 2:
            raise GemmalabError(f"`batch_size` must be >= 1 and `seq_len` >= 2, got {self.batch_size} and {self.seq_len}")


@dataclass
class HeldoutSection:
    """`[heldout]`: the evaluation before and after training."""

    max_new_tokens: int = 32
    batch_size: int = 32
    limit: int | None = None  # at most this many held-out dialogues

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or (self.limit is not None and self.limit < 1):
            raise GemmalabError("`max_new_tokens`, `batch_size` and `limit` must be >= 1")


@dataclass
class SFTConfig:
    """Everything an SFT run needs (TOML sections of the same names)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: SFTData = field(default_factory=lambda: SFTData(builtin=BuiltinTasks()))
    lora: LoRAConfig | None = None  # [lora]: adapters only; absent: full fine-tuning
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-5, weight_decay=0.0))
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    carbon: CarbonConfig = field(default_factory=CarbonConfig)
    debug: DebugSection = field(default_factory=DebugSection)
    heldout: HeldoutSection = field(default_factory=HeldoutSection)
    out_dir: str = "runs/tiny/sft"

    def __post_init__(self) -> None:
        resolve_run(self)


@dataclass
class HeldoutItem:
    """One held-out dialogue: the messages before the answer, the answer, its task, and the rendered dialogue."""

    id: str
    prompt: list[dict]
    answer: str
    task: str
    example: Example | None


def sft(cfg: SFTConfig, out: str | Path | None = None, resume: bool = False, *, progress: bool | None = None) -> dict:
    """Run (or resume) supervised fine-tuning into `out` (default `cfg.out_dir`); returns what result.json holds."""
    trainer = Trainer(cfg, out if out is not None else cfg.out_dir, "sft", resume)
    d, data, run = trainer.dist, cfg.data, trainer.run
    model, tokenizer = trainer.build_model()
    if data.tokenizer:
        from gemmalab.checkpoint import load_tokenizer

        tokenizer = load_tokenizer(data.tokenizer)
    if tokenizer is None:
        raise GemmalabError("SFT needs a tokenizer: set data.tokenizer, or model.init_from a model that has one.")
    if tokenizer.vocab_size > cfg.model.config.vocab_size:
        raise GemmalabError(f"The tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                            f"{cfg.model.config.vocab_size}.")

    examples, counts = _training_examples(cfg, tokenizer)
    heldout = _heldout_items(cfg, tokenizer)
    before = _heldout_once(run, "before", model, tokenizer, heldout, cfg, reuse=True,
                           write=d.is_main)  # on the starting weights

    if cfg.lora is not None:
        apply_lora(model, cfg.lora, seed=cfg.train.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batches = DialogueBatches(examples, data.batch_size, data.seq_len, pad_id=tokenizer.pad_id, packing=data.packing,
                              seed=data.seed, rank=d.rank, world_size=d.world_size)
    export = (lambda state, folder: merge(state, cfg.lora.scale)) if cfg.lora is not None else None
    result = trainer.fit(model, NextTokenObjective(cfg.train.z_loss, cfg.train.loss_chunk_mb), batches,
                         seq_len=data.seq_len, tokenizer=tokenizer, progress=progress, export_state=export)
    status = result.pop("status")
    if status != "finished":
        return {"stage": "sft", "status": status, **result}
    after = _heldout_once(run, "after", model, tokenizer, heldout, cfg, reuse=False, write=d.is_main)
    if cfg.lora is not None and d.is_main:
        result["adapter_dir"] = str(save_adapter(model, cfg.lora, run.path / "adapter", cfg.model.init_from))
    figures = {
        "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
        "heldout_loss_before": before["loss"], "heldout_loss_after": after["loss"], "heldout": before["n"],
        # the share of held-out answers that ended with <end_of_turn> (rather than <eos> or the length limit)
        "ended_turn_before": before["ended_turn"], "ended_turn_after": after["ended_turn"],
        "accuracy_by_task": {"before": before["by_task"], "after": after["by_task"]},
        **counts, "trainable_params": trainable, "lora": asdict(cfg.lora) if cfg.lora is not None else None,
        **result,
    }
    if d.is_main:
        run.write_result(status, figures)
    return {"stage": "sft", "status": status, **figures}


# ---- data -----------------------------------------------------------------------------------------


def _training_examples(cfg: SFTConfig, tokenizer) -> tuple[list[Example], dict]:
    """Read, filter and render the training dialogues; returns the examples and every count (they reconcile:
    lines read = malformed + filtered out + dropped at rendering + trained)."""
    data = cfg.data
    dialogues, malformed, malformed_examples = [], 0, []
    for path in data.train:
        for where, messages, problem in read_dialogues(path):
            if messages is None:
                malformed += 1
                if len(malformed_examples) < 5:
                    malformed_examples.append(problem)
            else:
                dialogues.append((where, messages))
    if data.builtin is not None:
        train, _ = builtin_dialogues(data.builtin)
        dialogues += [(f"builtin:{e['task']}:{i}", e["messages"]) for i, e in enumerate(train)]
    kept, report = filter_dialogues(dialogues, data.filters)
    examples, dropped = [], Counter()
    for where, messages in kept:
        out = render(tokenizer, messages, data.seq_len + 1, where)
        if isinstance(out, str):
            dropped[out] += 1
        else:
            examples.append(out)
    if not examples:
        raise GemmalabError(f"No training dialogue is left: {malformed} malformed, filters {report.dropped}, "
                            f"rendering dropped {dict(dropped)}.")
    counts = {"dialogues_read": len(dialogues) + malformed, "malformed_lines": malformed,
              "malformed_examples": malformed_examples, "filters": report.to_dict(),
              "render_dropped": dict(dropped), "dialogues_trained": len(examples)}
    return examples, counts


def _heldout_items(cfg: SFTConfig, tokenizer) -> list[HeldoutItem]:
    """The held-out dialogues (built-in tasks and files), at most `heldout.limit`."""
    items = []
    if cfg.data.builtin is not None:
        _, heldout = builtin_dialogues(cfg.data.builtin)
        for i, e in enumerate(heldout):
            items.append(HeldoutItem(f"builtin:{i}", e["messages"][:-1], e["answer"], e["task"], None))
    for path in cfg.data.heldout:
        for where, messages, problem in read_dialogues(path):
            if messages is None:
                raise GemmalabError(problem)
            last = max((i for i, m in enumerate(messages) if m["role"] == "model"), default=None)
            if last is None:
                raise GemmalabError(f"{where}: a held-out dialogue needs a model turn (its answer)")
            items.append(HeldoutItem(where, messages[:last], messages[last]["content"], Path(path).stem, None))
    items = items[:cfg.heldout.limit] if cfg.heldout.limit is not None else items
    for item in items:
        out = render(tokenizer, item.prompt + [{"role": "model", "content": item.answer}], cfg.data.seq_len + 1, item.id)
        item.example = out if isinstance(out, Example) else None
    return items


# ---- held-out evaluation --------------------------------------------------------------------------


def _heldout_once(run: RunDir, when: str, model, tokenizer, items: list[HeldoutItem], cfg: SFTConfig,
                  reuse: bool, write: bool) -> dict:
    """Held-out figures, every answer written to OUT/heldout_{when}.jsonl (a last "_summary" record holds the
    figures). With `reuse`, figures already there are read back (a resumed run's "before" was measured on the base
    weights, which it no longer has once the checkpoint is loaded)."""
    path = run.path / f"heldout_{when}.jsonl"
    if not items:
        return {"accuracy": None, "loss": None, "ended_turn": None, "n": 0, "by_task": {}}
    if reuse and path.is_file():
        summary = [obj for _, obj in read_jsonl(path) if obj.get("id") == "_summary"]
        if summary and summary[0].get("n") == len(items):
            return {k: summary[0][k] for k in ("accuracy", "loss", "ended_turn", "n", "by_task")}
    figures, records = heldout_figures(model, tokenizer, items, cfg.heldout, cfg.data)
    if write:
        run.create()
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records + [{"id": "_summary",
                                                                                                 **figures}]))
    return figures


@torch.no_grad()
def heldout_figures(model, tokenizer, items: list[HeldoutItem], cfg: HeldoutSection, data: SFTData
                    ) -> tuple[dict, list[dict]]:
    """Exact-match accuracy of greedy answers (trimmed) and the mean loss on the answers' tokens (their model turn
    and <end_of_turn>), overall and per task; and one record per item."""
    from gemmalab.inference import Engine, SamplingParams
    from gemmalab.inference.engine import eval_mode
    from gemmalab.train.loss import lm_loss

    engine = Engine(model, tokenizer, max_batch_size=cfg.batch_size)
    prompts = [tokenizer.apply_chat_template(item.prompt) for item in items]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0))
    records = [{"id": item.id, "task": item.task, "answer": item.answer, "output": out.text,
                "correct": is_correct(out.text, item.answer), "ended_turn": out.stop_id == tokenizer.end_of_turn_id}
               for item, out in zip(items, outs)]
    examples = [item.example for item in items if item.example is not None]
    rows = pack_rows(examples, data.seq_len)
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with eval_mode(model):
        for start in range(0, len(rows), data.batch_size):
            b = rows_batch([[examples[i] for i in row] for row in rows[start:start + data.batch_size]], data.seq_len,
                           tokenizer.pad_id)
            lo = lm_loss(model, b.inputs.to(device), b.targets.to(device), positions=b.positions.to(device),
                         doc_ids=b.doc_ids.to(device), reduction="sum")
            total += float(lo.ce)
            count += int(lo.n_tokens)
    by_task: dict[str, list[bool]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r["correct"])
    figures = {"accuracy": sum(r["correct"] for r in records) / len(records), "loss": total / count if count else None,
               "ended_turn": sum(r["ended_turn"] for r in records) / len(records), "n": len(records),
               "by_task": {t: sum(v) / len(v) for t, v in sorted(by_task.items())}}
    return figures, records
