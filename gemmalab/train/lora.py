"""LoRA (Hu et al. 2021): a trainable low-rank update on chosen linear layers of a frozen model.

    y = x W^T + (alpha / rank) * dropout(x) A^T B^T        A: [rank, in] (Kaiming-uniform), B: [out, rank] (zeros)

B starts at zero, so the adapted model starts as the base model. The adapted layers stay `nn.Linear`s with the same
parameter names (`layers.0.attn.q.weight`, now frozen, plus `...q.lora_a` and `...q.lora_b`), so checkpoints,
FSDP and the optimizer see a plain model with a few more parameters. `merge` folds the update into the weights:
the exported model is a plain Gemma that any reader loads; `save_adapter` writes the adapter alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gemmalab.errors import GemmalabError

__all__ = ["LoRAConfig", "LoRALinear", "apply_lora", "merge", "save_adapter", "load_adapter", "TARGETS"]

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # attention and MLP projections of every block


@dataclass
class LoRAConfig:
    """`[lora]`: present in a config, the stage trains adapters only."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(TARGETS))

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise GemmalabError(f"need `rank` >= 1, `alpha` > 0 and 0 <= `dropout` < 1, got {self.rank}, "
                                f"{self.alpha} and {self.dropout}")
        unknown = set(self.targets) - set(TARGETS)
        if unknown or not self.targets:
            raise GemmalabError(f"`targets` must name some of {', '.join(TARGETS)}, got {self.targets}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank update (see the module docstring); made in place by `apply_lora`."""

    lora_a: nn.Parameter
    lora_b: nn.Parameter
    lora_scale: float
    lora_dropout: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        h = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
        return out + F.linear(F.linear(h, self.lora_a), self.lora_b) * self.lora_scale


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> list[str]:
    """Freeze every parameter of `model` and turn its target linear layers into LoRALinear (in place, seeded
    initialisation); returns the names of the adapted layers."""
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    adapted = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in cfg.targets or type(module) is not nn.Linear:
            continue
        weight = module.weight
        a = torch.empty(cfg.rank, module.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)  # as nn.Linear initialises its weight
        module.__class__ = LoRALinear
        module.lora_a = nn.Parameter(a.to(weight.device, weight.dtype))
        module.lora_b = nn.Parameter(torch.zeros(module.out_features, cfg.rank, device=weight.device, dtype=weight.dtype))
        module.lora_scale, module.lora_dropout = cfg.scale, cfg.dropout
        adapted.append(name)
    if not adapted:
        raise GemmalabError(f"LoRA found no linear layer named {cfg.targets} to adapt.")
    return adapted


def merge(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A model state dict with adapters -> the plain one: W + scale * B @ A for each adapted layer (in fp32)."""
    out = {k: v for k, v in state.items() if not k.endswith((".lora_a", ".lora_b"))}
    for key, a in state.items():
        if key.endswith(".lora_a"):
            layer = key[: -len(".lora_a")]
            b, w = state[layer + ".lora_b"], state[layer + ".weight"]
            out[layer + ".weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


def save_adapter(model: nn.Module, cfg: LoRAConfig, directory: str | Path, base_model: str | None = None) -> Path:
    """The adapter alone: `adapter.safetensors` (each adapted layer's lora_a [rank, in] and lora_b [out, rank], by
    our parameter names) and `adapter_config.json` (rank, alpha, dropout, targets, the base model reference)."""
    from safetensors.torch import save_file

    from gemmalab.files import write_json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().float().contiguous().cpu() for name, p in model.named_parameters()
               if name.endswith((".lora_a", ".lora_b"))}
    save_file(tensors, directory / "adapter.safetensors", metadata={"format": "pt"})
    write_json(directory / "adapter_config.json", {**asdict(cfg), "scale": cfg.scale, "base_model": base_model,
                                                   "layers": sorted({n.rsplit(".", 1)[0] for n in tensors})})
    return directory


def load_adapter(model: nn.Module, directory: str | Path) -> LoRAConfig:
    """Adapt `model` as `save_adapter` recorded and load the adapter's tensors; returns its config."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        raw = json.loads((directory / "adapter_config.json").read_text())
        cfg = LoRAConfig(raw["rank"], raw["alpha"], raw["dropout"], raw["targets"])
    except (OSError, ValueError, KeyError) as e:
        raise GemmalabError(f"{directory / 'adapter_config.json'} cannot be read: {e}") from None
    apply_lora(model, cfg)
    tensors = load_file(str(directory / "adapter.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(n for n in params if n.endswith((".lora_a", ".lora_b")) and n not in tensors)
    if missing or set(tensors) - set(params):
        raise GemmalabError(f"{directory} does not fit this model: missing {missing[:4]}, unexpected "
                            f"{sorted(set(tensors) - set(params))[:4]}")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return cfg
