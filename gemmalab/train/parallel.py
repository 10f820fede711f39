"""Distributed setup and parallelism, applied to a plain `Gemma` in one place (torchtitan style).

- `setup_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts a
  process group: NCCL on CUDA, gloo on CPU. Without torchrun it is a single process, no group.
- `parallelize(model, ...)` applies, per block and in this order: activation checkpointing,
  `torch.compile`, FSDP2 `fully_shard`; then `fully_shard` on the root (embedding, final norm,
  and the tied output projection, which reuses `embed.weight`).

Parameter names are never changed: checkpointing and compile replace a block's `forward` instead of
wrapping the block in another module, so `named_parameters()` and `state_dict()` keys stay those of
the plain model (optimizer groups, checkpoints and HF export see the same names with or without them).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from gemmalab.errors import GemmalabError

try:  # torch >= 2.6
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # torch 2.4 / 2.5
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard

__all__ = ["DistInfo", "setup_distributed", "teardown", "parallelize", "all_reduce_sum"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, number of processes, rank on this host, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files other ranks do not."""
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Start the process group if launched by torchrun (RANK and WORLD_SIZE set), else a single process.

    NCCL when CUDA is available (one GPU per process, picked by LOCAL_RANK), gloo on CPU. Calling it
    again in a process that already has a group returns the same answer.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before init: NCCL binds this process to its GPU
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        # device_id (CUDA) makes NCCL connect eagerly and lets collectives know their device.
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank, world_size, local_rank, device)


def teardown() -> None:
    """Destroy the process group, if any (at the end of a run, so torchrun exits cleanly)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over all ranks (a new tensor); `x` itself when there is no process group."""
    if not dist.is_initialized():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def parallelize(model: nn.Module, *, world_size: int, mixed_precision: bool, activation_checkpointing: bool,
                compile: bool, device: torch.device | str) -> nn.Module:
    """Apply activation checkpointing, compile and FSDP2 to a `Gemma` (in place) and return it.

    world_size: data-parallel processes; FSDP2 is applied whenever a process group is running (also
        with one process, so a one-GPU torchrun run gets the same mixed precision), never without one.
    mixed_precision: bf16 parameters in forward and backward, fp32 gradient reduction, fp32 master
        parameters (what the optimizer updates). Needs FSDP, hence a process group.
    activation_checkpointing: recompute each block's activations in backward (memory for compute).
    compile: `torch.compile` each block (the same code per block, so one compile serves them all).
    device: where the parameters live; the model is moved there first (FSDP shards from there).

    The output projection is tied to `embed.weight`; both live in the root FSDP unit, so the
    embedding lookup and the logits use the same all-gathered weight and one gradient.
    """
    distributed = dist.is_initialized()
    if distributed and dist.get_world_size() != world_size:
        raise GemmalabError(f"world_size={world_size} but the process group has {dist.get_world_size()} processes.")
    if not distributed and world_size != 1:
        raise GemmalabError(f"world_size={world_size} needs a process group: launch with torchrun.")
    if mixed_precision and not distributed:
        raise GemmalabError(
            "bf16 mixed precision is applied by FSDP2, which needs a process group: launch with "
            "`torchrun --nproc-per-node 1 -m gemmalab ...` (one process is fine), or turn mixed precision off."
        )
    device = torch.device(device)
    model.to(device)
    for block in model.layers:
        _wrap_block_forward(block, activation_checkpointing, compile)
    if not distributed:
        return model

    mesh = _device_mesh(device.type, world_size)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
          else MixedPrecisionPolicy())
    # Blocks keep their float inputs as given: the rotary cos/sin are computed in f32 on purpose
    # (as in a plain bf16 model); the default cast_forward_inputs would round them to bf16.
    block_mp = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=mp.reduce_dtype, cast_forward_inputs=False)
    last = len(model.layers) - 1
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=mesh, mp_policy=block_mp, reshard_after_forward=i < last)
    # Root: embed (also the tied output weight) and the final norm. Kept gathered after forward, so a
    # loss that applies `embed.weight` to hidden states outside forward (chunked CE) sees the full weight.
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def _device_mesh(device_type: str, world_size: int):
    """A 1-D data-parallel mesh over all processes."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))


def _wrap_block_forward(block: nn.Module, activation_checkpointing: bool, compile: bool) -> None:
    """Replace `block.forward` by a checkpointed and/or compiled version of itself.

    Done on the forward (not by wrapping the module) so parameter names do not change, and so FSDP2's
    hooks (on the module call) stay outside both the checkpoint and the compiled graph: recomputation
    in backward runs while FSDP still holds the gathered parameters.
    """
    if not (activation_checkpointing or compile):
        return
    forward = block.forward
    if activation_checkpointing:
        # Non-reentrant: works with kwargs, with inputs that need no grad, and under torch.compile.
        forward = functools.partial(checkpoint, forward, use_reentrant=False)
    if compile:
        forward = torch.compile(forward)
    block.forward = forward
