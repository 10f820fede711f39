"""Loading a name -> tensor mapping into a Gemma model, with one clear report of what does not fit."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from gemmalab.errors import GemmalabError
from gemmalab.model import Gemma, ModelConfig


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # ours (layers.3.attn...) and transformers' (model.layers.3...)


def check_layer_count(config: ModelConfig, names: Iterable[str], source: str) -> None:
    """Refuse a config with more layers than the checkpoint has tensors for before a model of that size is built
    (num_hidden_layers = 10**9 in a hostile config.json would take hours to build, even on the meta device)."""
    present = len({m.group(1) for m in map(_LAYER.search, names) if m})
    if config.n_layers > present:
        raise GemmalabError(f"The checkpoint {source} holds the tensors of {present} layer(s), but its config says "
                            f"{config.n_layers}.")


def build_model(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Gemma:
    """A Gemma with `tensors` (our parameter names) as weights; every mismatch is reported at once."""
    check_layer_count(config, tensors, source)
    with torch.device("meta"):
        model = Gemma(config)
    expected = {name: p.shape for name, p in model.named_parameters()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(
        f"{name} (checkpoint {tuple(t.shape)}, config expects {tuple(expected[name])})"
        for name, t in tensors.items() if name in expected and t.shape != expected[name]
    )
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s): {_listing(unexpected)}")
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped tensor(s): {_listing(misshaped, 4)}")
        raise GemmalabError(
            f"The checkpoint {source} does not fit the model config "
            f"({config.family}, dim {config.dim}, {config.n_layers} layers, vocab {config.vocab_size}): "
            + "; ".join(parts) + "."
        )
    state = {name: t.to(dtype=dtype, device=device) for name, t in tensors.items()}
    model.load_state_dict(state, assign=True)
    return model.eval()
