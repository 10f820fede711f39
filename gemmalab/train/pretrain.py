"""Pretraining: the next-token objective over packed token shards on the shared loop, and the dry run.

    cfg = gemmalab.config.load(PretrainConfig, "configs/train/tiny.toml", ["train.steps=50"])
    result = pretrain(cfg, "runs/tiny/pretrain")          # what result.json holds
    plan = dry_run(cfg, world_size=8)                     # parameters, memory per device, tokens per step

The run directory (gemmalab.runs): config.toml, metrics.jsonl, tensorboard/, checkpoints/, model/, result.json
(stage "pretrain": steps, tokens, final_loss, seconds, tokens_per_s, mfu, params, carbon, model_dir).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from gemmalab.data.loader import Batch, TokenLoader
from gemmalab.data.mixture import Mixture
from gemmalab.dtypes import dtype_name
from gemmalab.errors import GemmalabError
from gemmalab.model.gemma import Gemma
from gemmalab.train.config import DEFAULT_PRESET, CheckpointSection, DebugSection, ModelSpec, TrainSection, resolve_run
from gemmalab.train.loop import LossOutput, Trainer
from gemmalab.train.metrics import CarbonConfig
from gemmalab.train.optim import OptimConfig

__all__ = ["PretrainData", "PretrainConfig", "NextTokenObjective", "pretrain", "plan", "dry_run"]

GiB = 2**30


@dataclass
class PretrainData:
    """`[data]`: token shards and batch shape. batch_size is per process and per micro-batch."""

    shards: list[str] = field(default_factory=lambda: ["runs/data/builtin/tokens"])
    # The tokenizer the shards were made with (checked when the run starts: data preparation may still be making
    # it), copied into the exported model directory: a tokenizer.model file or a model REF (registered name, model
    # directory, .gguf). None: init_from's, if any.
    tokenizer: str | None = None
    batch_size: int = 8
    seq_len: int = 256
    mixture: Mixture | None = None  # [[data.mixture.stages]] until / weights; None: each source's natural share
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1:
            raise GemmalabError(f"`batch_size` and `seq_len` must be >= 1, got {self.batch_size} and {self.seq_len}")
        if not self.shards:
            raise GemmalabError("`shards` must name at least one token shard folder")


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs (TOML sections of the same names; gemmalab.config.load builds one)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: PretrainData = field(default_factory=PretrainData)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    carbon: CarbonConfig = field(default_factory=CarbonConfig)
    debug: DebugSection = field(default_factory=DebugSection)
    out_dir: str = "runs/tiny/pretrain"

    def __post_init__(self) -> None:
        resolve_run(self)


class NextTokenObjective:
    """The language-model loss over packed rows (document-masked attention through positions and doc_ids): the
    fused, chunked cross-entropy with the tied embedding, summed over target tokens. Figures: ce and z (means)."""

    def __init__(self, z_loss: float = 0.0, loss_chunk_mb: int = 256) -> None:
        self.z_loss, self.chunk_bytes = z_loss, loss_chunk_mb * 2**20

    def units(self, batch: Batch) -> torch.Tensor:
        return (batch.targets != -100).sum()

    def tokens(self, batch: Batch) -> int:
        return batch.inputs.numel()

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOutput:
        from gemmalab.train.loss import lm_loss

        device = model.embed.weight.device
        out = lm_loss(model, batch.inputs.to(device), batch.targets.to(device), positions=batch.positions.to(device),
                      doc_ids=batch.doc_ids.to(device), z_loss=self.z_loss, reduction="sum",
                      chunk_bytes=self.chunk_bytes)
        return LossOutput(out.loss, {"ce": out.ce, "z": out.z})


def pretrain(cfg: PretrainConfig, out: str | Path | None = None, resume: bool = False, *,
             progress: bool | None = None) -> dict:
    """Run (or resume) pretraining into `out` (default `cfg.out_dir`); returns what result.json holds (with
    "status": "interrupted" and no result.json when stopped by a signal; --resume continues it)."""
    trainer = Trainer(cfg, out if out is not None else cfg.out_dir, "pretrain", resume)
    d, data, t = trainer.dist, cfg.data, cfg.train
    total = t.steps * t.grad_accum * data.batch_size * data.seq_len * d.world_size
    loader = TokenLoader(data.shards, batch_size=data.batch_size, seq_len=data.seq_len, mixture=data.mixture,
                         total_tokens=total, rank=d.rank, world_size=d.world_size, seed=data.seed)
    vocab = cfg.model.config.vocab_size
    if loader.meta.vocab_size > vocab:
        raise GemmalabError(f"The token shards {data.shards} use a {loader.meta.vocab_size}-token vocabulary but the model "
                            f"has vocab_size {vocab}; set model.vocab_size = {loader.meta.vocab_size}.")
    tokenizer = None
    if data.tokenizer:
        from gemmalab.checkpoint import load_tokenizer

        tokenizer = load_tokenizer(data.tokenizer)
        if tokenizer is None:
            raise GemmalabError(f"data.tokenizer {data.tokenizer} has no tokenizer (tokenizer.model).")
        _check_tokenizer(tokenizer, loader, f"data.tokenizer {data.tokenizer}", data.shards)
    model, own_tokenizer = trainer.build_model()
    if tokenizer is None and own_tokenizer is not None:
        _check_tokenizer(own_tokenizer, loader, f"The tokenizer of model.init_from {cfg.model.init_from}", data.shards)
        tokenizer = own_tokenizer
    result = trainer.fit(model, NextTokenObjective(t.z_loss, t.loss_chunk_mb), loader, seq_len=data.seq_len,
                         tokenizer=tokenizer, progress=progress)
    status = result.pop("status")
    if status == "finished" and d.is_main:
        trainer.run.write_result(status, result)
    return {"stage": "pretrain", "status": status, **result}


def _check_tokenizer(tokenizer, loader: TokenLoader, what: str, shards: list[str]) -> None:
    if tokenizer.fingerprint() != loader.meta.tokenizer_fingerprint:
        raise GemmalabError(f"{what} is not the tokenizer the shards {shards} were made with (fingerprints differ).")


# ---- dry run ------------------------------------------------------------------------------------


def plan(cfg: PretrainConfig, world_size: int = 1) -> dict:
    """What a run would use, computed on the meta device (nothing is allocated).

    Memory per device is an estimate: fp32 master weights, fp32 gradients and two fp32 AdamW moments,
    sharded over `world_size` by FSDP; bf16 copies of the gathered blocks; activations (with activation
    checkpointing: each block's input, plus one block's working set during recomputation); one loss tile.
    """
    from gemmalab.train.loss import loss_chunk_rows

    if world_size < 1:
        raise GemmalabError(f"world_size must be >= 1, got {world_size}")
    mc = cfg.model.config
    with torch.device("meta"):
        model = Gemma(mc)
    params = sum(p.numel() for p in model.parameters())
    t, data = cfg.train, cfg.data
    B, T, D = data.batch_size, data.seq_len, mc.dim
    act_bytes = 2 if t.dtype == torch.bfloat16 else 4
    block_params = sum(p.numel() for p in model.layers[0].parameters())
    state = params * 16 / world_size  # fp32 weights + grads + exp_avg + exp_avg_sq, sharded
    gathered = 2 * block_params * act_bytes if world_size > 1 else 0  # current + prefetched block, unsharded
    # One block's activations kept for backward: inputs of the norms, q/k/v/o, MLP gate/up/act/down, residuals.
    per_block = B * T * act_bytes * (6 * D + 2 * (mc.n_heads + mc.n_kv_heads) * mc.head_dim + 3 * mc.ffn_dim)
    per_block += B * T * T  # the bool attention mask (shared by the layers of a kind)
    if t.activation_checkpointing:
        activations = mc.n_layers * B * T * D * act_bytes + per_block
    else:
        activations = mc.n_layers * per_block
    # The loss (gradients formed in its forward): two fp32 tiles of logits (probabilities, or the soft-cap's tanh),
    # the hidden gradient (fp32 while it accumulates over vocabulary blocks) and the embedding gradient.
    rows = min(B * T, loss_chunk_rows(mc.vocab_size, t.loss_chunk_mb * 2**20))
    loss_tile = rows * mc.vocab_size * 4 * 2 + B * T * D * 4 + mc.vocab_size * D * act_bytes
    total = state + gathered + activations + loss_tile
    tokens_per_step = B * T * t.grad_accum * world_size
    return {
        "model": cfg.model.init_from or cfg.model.preset or DEFAULT_PRESET, "parameters": params,
        "parameters_formula": mc.num_params(), "world_size": world_size, "dtype": dtype_name(t.dtype),
        "fsdp": world_size > 1, "activation_checkpointing": t.activation_checkpointing, "compile": t.compile,
        "batch_size_per_device": B, "seq_len": T, "grad_accum": t.grad_accum,
        "tokens_per_step": tokens_per_step, "steps": t.steps, "total_tokens": tokens_per_step * t.steps,
        "memory_per_device_gib": {"weights_grads_optimizer": state / GiB, "gathered_blocks": gathered / GiB,
                                  "activations": activations / GiB, "loss": loss_tile / GiB, "total": total / GiB},
    }


def dry_run(cfg: PretrainConfig, world_size: int = 1, file: TextIO | None = None) -> dict:
    """Print the plan of a run (parameters, memory per device, tokens per step) without allocating; return it."""
    p = plan(cfg, world_size)
    m = p["memory_per_device_gib"]
    lines = [
        f"model            {p['model']}: {p['parameters']:,} parameters",
        f"parallelism      {p['world_size']} device(s), FSDP2 {'on' if p['fsdp'] else 'off'}, {p['dtype']}, "
        f"activation checkpointing {'on' if p['activation_checkpointing'] else 'off'}, "
        f"compile {'on' if p['compile'] else 'off'}",
        f"batch            {p['batch_size_per_device']} x {p['seq_len']} tokens per device x {p['grad_accum']} "
        f"micro-batches x {p['world_size']} devices = {p['tokens_per_step']:,} tokens per step",
        f"run              {p['steps']:,} steps = {p['total_tokens']:,} tokens",
        f"memory/device    {m['total']:.1f} GiB (estimate): weights+grads+AdamW {m['weights_grads_optimizer']:.1f}, "
        f"gathered blocks {m['gathered_blocks']:.1f}, activations {m['activations']:.1f}, loss {m['loss']:.1f}",
    ]
    print("\n".join(lines), file=file or sys.stdout)
    return p
