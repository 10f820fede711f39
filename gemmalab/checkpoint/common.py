"""Loading a name -> tensor mapping into a Gemma model, with one clear report of what does not fit."""

from __future__ import annotations

import torch

from gemmalab.errors import GemmalabError
from gemmalab.model import Gemma, ModelConfig


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def build_model(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Gemma:
    """A Gemma with `tensors` (our parameter names) as weights; every mismatch is reported at once."""
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
