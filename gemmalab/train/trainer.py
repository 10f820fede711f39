"""The training loop (pretraining; SFT and reward modelling reuse it) and the pretraining dry run.

`train(cfg, out_dir, resume)` runs one stage into a run directory (docs/train.md, design.md):

    OUT/config.toml      resolved config            OUT/checkpoints/step-NNNNNNN/   DCP train state
    OUT/metrics.jsonl    one line per logged step   OUT/tensorboard/                the same, for TensorBoard
    OUT/model/           HF model directory         OUT/result.json                 headline figures

One step = `grad_accum` micro-batches of `batch_size` rows per process, each through `lm_loss` with the
batch's positions and doc_ids (document-masked attention over packed rows); the loss is summed and
divided by the step's token count over all ranks, so accumulation and data parallelism give the mean
over every token of the step. Then clipping, a non-finite check (skip the update, log it, stop after
`max_bad_steps` in a row), AdamW and the LR schedule.

Also runnable as `python -m gemmalab.train.trainer --config FILE [key=value ...] [--resume] [--out DIR] [--dry-run]`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist

from gemmalab.data.loader import TokenLoader
from gemmalab.errors import GemmalabError
from gemmalab.host_memory import keep_freed_memory
from gemmalab.model.config import ModelConfig
from gemmalab.model.gemma import Gemma
from gemmalab.train.checkpoint import latest_complete, load_checkpoint, save_checkpoint
from gemmalab.train.config import TrainConfig, load_config, to_toml
from gemmalab.train.parallel import DistInfo, parallelize, setup_distributed, teardown

__all__ = ["train", "dry_run", "plan", "main", "run_from_args"]

log = logging.getLogger(__name__)

GiB = 2**30


# ---- setup --------------------------------------------------------------------------------------


def _setup_distributed(cfg: TrainConfig) -> DistInfo:
    """torchrun: a process group via gemmalab.train.parallel; otherwise one process on train.device."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return setup_distributed()
    name = cfg.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return DistInfo(0, 1, 0, torch.device(name))


def _build_model(mc: ModelConfig, cfg: TrainConfig, d: DistInfo) -> tuple[Gemma, bool]:
    """Seeded fp32 model on the device, parallelized; returns (model, autocast_bf16).

    Built on the meta device and materialized directly where it runs (no full CPU copy per rank), then
    initialized from one seeded CPU generator: the same weights whatever the device or world size.
    """
    with torch.device("meta"):
        model = Gemma(mc)
    model.to_empty(device=d.device)
    model.init_weights(std=cfg.train.init_std, seed=cfg.train.seed)
    t = cfg.train
    bf16 = t.dtype == "bf16"
    distributed = dist.is_initialized()
    if distributed or t.activation_checkpointing or t.compile:
        # Under FSDP2, bf16 is its mixed-precision policy (bf16 params in compute, fp32 master and reduce).
        model = parallelize(model, world_size=d.world_size, mixed_precision=bf16 and distributed,
                            activation_checkpointing=t.activation_checkpointing, compile=t.compile, device=d.device)
    # Without FSDP, bf16 is autocast over fp32 master weights (CPU and CUDA).
    return model, bf16 and not distributed


def _loader(cfg: TrainConfig, d: DistInfo) -> TokenLoader:
    t, data = cfg.train, cfg.data
    total = t.steps * t.grad_accum * data.batch_size * data.seq_len * d.world_size
    return TokenLoader(data.shards, batch_size=data.batch_size, seq_len=data.seq_len, mixture=cfg.mixture(),
                       total_tokens=total, rank=d.rank, world_size=d.world_size, seed=data.seed)


class _StopFlag:
    """SIGTERM (and SIGINT) set a flag; the loop checkpoints at the next step boundary and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if _in_main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def any_rank(self, device: torch.device) -> bool:
        """Whether any rank was signalled (all ranks must stop at the same step)."""
        flag = self.signal is not None
        if dist.is_initialized():
            t = torch.tensor([1.0 if flag else 0.0], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _trim_metrics(path: Path, last_step: int) -> None:
    """Drop metrics.jsonl lines of steps after `last_step` (a killed run logged steps its checkpoint lacks)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line).get("step")
        except ValueError:
            continue  # a line cut by the kill
        if isinstance(step, int) and step <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(s + "\n" for s in kept), encoding="utf-8")
    tmp.replace(path)


def _metrics_logger(out: Path):
    """metrics.jsonl plus TensorBoard; without the tensorboard package, metrics.jsonl alone (with a warning)."""
    from gemmalab.train.metrics import MetricsLogger

    try:
        return MetricsLogger(out)
    except GemmalabError as e:
        log.warning("%s Logging to metrics.jsonl only.", e)
        return MetricsLogger(out, tensorboard=False)


def _peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one device for MFU; None (no MFU logged) for an unknown GPU."""
    from gemmalab.train.metrics import peak_flops

    try:
        return peak_flops(device, dtype)
    except GemmalabError as e:
        log.warning("MFU not logged: %s", e)
        return None


def _nan_hook(model: Gemma, steps: set[int], current: dict[str, int]):
    """Tests: make the embedding output NaN during the listed (1-based) steps."""
    def hook(module, inputs, output):
        if current["step"] in steps:
            return output + float("nan")
        return output

    return model.embed.register_forward_hook(hook)


# ---- the loop -----------------------------------------------------------------------------------


def train(cfg: TrainConfig, out_dir: str | Path | None = None, resume: bool = False, *,
          progress: bool | None = None) -> dict:
    """Run (or resume) training into `out_dir` (default `cfg.out_dir`); returns what result.json holds.

    resume: continue from the newest complete checkpoint in OUT/checkpoints (none: start fresh).
    Without resume, a run directory that already has checkpoints is refused rather than overwritten.
    On SIGTERM the loop checkpoints at the next step boundary and returns `{"status": "interrupted", ...}`.
    Raises GemmalabError after `train.max_bad_steps` non-finite steps in a row.
    """
    from gemmalab.train.loss import lm_loss
    from gemmalab.train.metrics import carbon, flops_per_token, memory_stats, mfu
    from gemmalab.train.optim import build_optimizer, build_scheduler

    out = Path(out_dir if out_dir is not None else cfg.out_dir)
    ckpt_dir = out / "checkpoints"
    t, data = cfg.train, cfg.data
    if t.threads:
        torch.set_num_threads(t.threads)
    d = _setup_distributed(cfg)
    if t.keep_freed_memory and d.device.type == "cpu":
        keep_freed_memory()
    mc = cfg.model_config()
    start = latest_complete(ckpt_dir) if resume else None
    if not resume and latest_complete(ckpt_dir) is not None:
        raise GemmalabError(f"{out} already has checkpoints from an earlier run; pass --resume to continue it, "
                            f"or choose another --out.")

    loader = _loader(cfg, d)
    if loader.meta.vocab_size > mc.vocab_size:
        raise GemmalabError(f"The token shards {data.shards} use a {loader.meta.vocab_size}-token vocabulary but the model "
                            f"has vocab_size {mc.vocab_size}; set model.vocab_size = {loader.meta.vocab_size}.")
    tokenizer = None
    if data.tokenizer:
        from gemmalab.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_file(data.tokenizer)
        if tokenizer.fingerprint() != loader.meta.tokenizer_fingerprint:
            raise GemmalabError(f"data.tokenizer {data.tokenizer} is not the tokenizer the shards {data.shards} were "
                                f"made with (fingerprints differ).")

    model, autocast_bf16 = _build_model(mc, cfg, d)
    ocfg = cfg.optim
    optimizer = build_optimizer(model, ocfg)
    scheduler = build_scheduler(optimizer, ocfg)

    step, elapsed, tokens_done = 0, 0.0, 0
    if start is not None:
        state = load_checkpoint(start, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        step, elapsed, tokens_done = int(state["step"]), float(state["elapsed"]), int(state["tokens"])
        if d.is_main:
            log.info("resumed from %s (step %d)", start, step)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
        _trim_metrics(out / "metrics.jsonl", step)  # fresh run: 0, so an old file is emptied
    logger = _metrics_logger(out) if d.is_main else None

    tokens_per_step = t.grad_accum * data.batch_size * data.seq_len * d.world_size
    fpt = flops_per_token(mc, data.seq_len)
    peak = _peak_flops(d.device, torch.bfloat16 if t.dtype == "bf16" else torch.float32)
    amp = (torch.autocast(d.device.type, dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext())
    current = {"step": 0}
    hook = _nan_hook(model, set(t.debug_nan_steps), current) if t.debug_nan_steps else None
    params = [p for p in model.parameters() if p.requires_grad]
    clip = ocfg.grad_clip if getattr(ocfg, "grad_clip", None) else math.inf

    def checkpoint(at: int) -> None:
        state = {"step": at, "elapsed": elapsed, "tokens": tokens_done, "loader": loader.state_dict(),
                 "scheduler": _jsonable(scheduler.state_dict()), "world_size": d.world_size}
        save_checkpoint(ckpt_dir, at, model, optimizer, state, keep=cfg.checkpoint.keep)

    from tqdm.auto import tqdm

    bar = tqdm(total=t.steps, initial=step, unit="step", desc="pretrain", dynamic_ncols=True,
               disable=(not d.is_main) or (None if progress is None else not progress))
    bad_in_row, last_loss, window_t, window_tokens = 0, None, 0.0, 0
    last_ckpt = step if start is not None else -1
    status = "finished"
    model.train()
    try:
        with _StopFlag() as stop:
            while step < t.steps:
                if stop.any_rank(d.device):
                    status = "interrupted"
                    break
                t0 = time.perf_counter()
                current["step"] = step + 1
                micro = [next(loader) for _ in range(t.grad_accum)]
                count = sum((b.targets != -100).sum() for b in micro).to(d.device, torch.float32)
                if dist.is_initialized():
                    dist.all_reduce(count)
                # Sum losses, divide by all tokens of the step: FSDP averages gradients over ranks, hence * world.
                scale = d.world_size / count.clamp(min=1)
                ce_sum = torch.zeros((), device=d.device)
                z_sum = torch.zeros((), device=d.device)
                for i, b in enumerate(micro):
                    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce once, after the last micro-batch
                        model.set_requires_gradient_sync(i == len(micro) - 1)
                    with amp:
                        lo = lm_loss(model, b.inputs.to(d.device), b.targets.to(d.device),
                                     positions=b.positions.to(d.device), doc_ids=b.doc_ids.to(d.device),
                                     z_loss=t.z_loss, reduction="sum", chunk_bytes=t.loss_chunk_mb * 2**20)
                    (lo.loss * scale).backward()
                    ce_sum += lo.ce.detach().float()
                    z_sum += lo.z.detach().float()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
                sums = torch.stack([ce_sum, z_sum])
                if dist.is_initialized():
                    dist.all_reduce(sums)
                ce, z = (sums / count.clamp(min=1)).tolist()
                loss = ce + t.z_loss * z
                gn = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                lr = float(lr)
                finite = math.isfinite(loss) and math.isfinite(gn)
                if finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()  # also on skipped steps: the LR stays a function of the step number
                step += 1
                tokens_done += tokens_per_step
                dt = time.perf_counter() - t0
                elapsed += dt
                window_t += dt
                window_tokens += tokens_per_step
                bar.update(1)
                if not finite:
                    bad_in_row += 1
                    reason = "non-finite loss" if not math.isfinite(loss) else "non-finite gradient norm"
                    if logger is not None:
                        logger.log(step, {"skipped": reason, "bad_steps_in_row": bad_in_row, "lr": lr})
                    log.warning("step %d: %s; update skipped (%d in a row)", step, reason, bad_in_row)
                    if bad_in_row >= t.max_bad_steps:
                        raise GemmalabError(
                            f"Training stopped at step {step}: {bad_in_row} non-finite steps in a row "
                            f"(train.max_bad_steps = {t.max_bad_steps}). Lower optim.lr, raise optim.warmup_steps or "
                            f"check the data; resume from the last checkpoint with --resume.")
                else:
                    bad_in_row = 0
                    last_loss = loss
                    if step % t.log_every == 0 or step == t.steps:
                        tps = window_tokens / window_t if window_t > 0 else 0.0
                        record = {"loss": loss, "ce": ce, "z": z, "lr": lr, "grad_norm": gn,
                                  "tokens": tokens_done, "tokens_per_s": tps,
                                  "mfu": _mfu(mfu, tps / d.world_size, fpt, peak),
                                  **memory_stats(d.device), "step_time_s": dt}
                        if logger is not None:
                            logger.log(step, record)
                        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                        window_t, window_tokens = 0.0, 0
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                    checkpoint(step)
                    last_ckpt = step
                if step == t.debug_hang_at_step:  # tests: a process killed at a known point
                    if d.is_main:
                        (out / f"hang-{step}").touch()
                    while stop.signal is None:
                        time.sleep(0.05)
            if last_ckpt != step and (cfg.checkpoint.at_end or status == "interrupted"):
                checkpoint(step)  # the end, or a signal: leave a checkpoint of where we are
    finally:
        bar.close()
        if hook is not None:
            hook.remove()
        if logger is not None:
            logger.close()

    tps = tokens_done / elapsed if elapsed > 0 else 0.0
    result = {"stage": "pretrain", "status": status, "steps": step, "tokens": tokens_done,
              "final_loss": last_loss, "seconds": elapsed, "tokens_per_s": tps,
              "mfu": _mfu(mfu, tps / d.world_size, fpt, peak), "params": mc.num_params(),
              "world_size": d.world_size, "device": str(d.device)}
    if status == "interrupted":
        if d.is_main:
            log.warning("stopped by signal at step %d; checkpoint written; continue with --resume", step)
        return result
    result["carbon"] = carbon(elapsed, dataclasses.replace(cfg.carbon, num_devices=d.world_size))
    if cfg.checkpoint.export:
        _export(model, mc, tokenizer, out / "model", d)
        result["model_dir"] = str(out / "model")
    if d.is_main:
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _mfu(fn, tokens_per_s_per_device: float, fpt: float, peak: float | None) -> float | None:
    if not peak or tokens_per_s_per_device <= 0:
        return None
    return float(fn(tokens_per_s_per_device, fpt, peak))


def _jsonable(obj: Any) -> Any:
    """Scheduler state as JSON (tensors to numbers, callables dropped: they are rebuilt from the config)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if not callable(v)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return None


def _export(model: torch.nn.Module, mc: ModelConfig, tokenizer, directory: Path, d: DistInfo) -> None:
    """The trained model as an HF model directory (rank 0 gathers the full fp32 weights)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from gemmalab.checkpoint.hf import save_hf

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.is_main:
        return
    with torch.device("meta"):
        plain = Gemma(mc)
    plain.load_state_dict({k: v.float() for k, v in full.items()}, assign=True)
    save_hf(plain, directory, tokenizer)


# ---- dry run ------------------------------------------------------------------------------------


def plan(cfg: TrainConfig, world_size: int = 1) -> dict:
    """What a run would use, computed on the meta device (nothing is allocated).

    Memory per device is an estimate: fp32 master weights, fp32 gradients and two fp32 AdamW moments,
    sharded over `world_size` by FSDP; bf16 copies of the gathered blocks; activations (with activation
    checkpointing: each block's input, plus one block's working set during recomputation); one loss tile.
    """
    from gemmalab.train.loss import loss_chunk_rows

    if world_size < 1:
        raise GemmalabError(f"world_size must be >= 1, got {world_size}")
    mc = cfg.model_config()
    with torch.device("meta"):
        model = Gemma(mc)
    params = sum(p.numel() for p in model.parameters())
    t, data = cfg.train, cfg.data
    B, T, D = data.batch_size, data.seq_len, mc.dim
    act_bytes = 2 if t.dtype == "bf16" else 4
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
        "model": cfg.model.preset, "parameters": params, "parameters_formula": mc.num_params(),
        "world_size": world_size, "dtype": t.dtype, "fsdp": world_size > 1,
        "activation_checkpointing": t.activation_checkpointing, "compile": t.compile,
        "batch_size_per_device": B, "seq_len": T, "grad_accum": t.grad_accum,
        "tokens_per_step": tokens_per_step, "steps": t.steps, "total_tokens": tokens_per_step * t.steps,
        "memory_per_device_gib": {"weights_grads_optimizer": state / GiB, "gathered_blocks": gathered / GiB,
                                  "activations": activations / GiB, "loss": loss_tile / GiB, "total": total / GiB},
    }


def dry_run(cfg: TrainConfig, world_size: int = 1, file: TextIO | None = None) -> dict:
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


# ---- command line -------------------------------------------------------------------------------


def run_from_args(args: argparse.Namespace) -> int:
    """Body of `gemmalab pretrain`: 0 when finished, 143 when stopped by SIGTERM (checkpoint written)."""
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        dry_run(cfg, world)
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = train(cfg, args.out, resume=args.resume)
    finally:
        teardown()
    if result["status"] == "interrupted":
        return 143
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("steps", "tokens", "final_loss", "seconds", "tokens_per_s", "mfu", "model_dir")
        print(json.dumps({k: result[k] for k in keys if k in result}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m gemmalab.train.trainer ...` is `gemmalab pretrain ...` (one parser, in gemmalab.cli)."""
    from gemmalab.cli import main as cli_main

    return cli_main(["pretrain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
