"""Scalar heads on the Gemma trunk: the reward model's score and the PPO value, read from the final hidden states.

A head is a `Linear(dim, 1)` attached to a `Gemma` as a submodule (`model.reward_head`, `model.value_head`), so
FSDP2 (it lives in the root unit, which stays gathered after forward), checkpoints and the optimizer see it like any
other parameter. The exported model directory holds the plain trunk (the head's keys stripped: transformers loads
it) and the head beside it in `<name>.safetensors`; `load_scored` puts them back together.

    add_head(model, "reward_head", seed=0)
    scores = sequence_scores(model, tokens, attention_mask)   # [B]: the head at each row's last real token
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gemmalab.errors import GemmalabError

__all__ = ["REWARD_HEAD", "VALUE_HEAD", "add_head", "last_real_index", "sequence_scores", "right_padded",
           "score_rows", "token_values",
           "split_head", "save_head", "load_scored"]

REWARD_HEAD = "reward_head"
VALUE_HEAD = "value_head"


def add_head(model: nn.Module, name: str = REWARD_HEAD, seed: int = 0) -> nn.Linear:
    """Attach a seeded `Linear(dim, 1)` as `model.<name>` (on the model's device, fp32) and return it.
    Small weights and a zero bias: every score starts near 0, so the first losses are those of a coin flip."""
    dim = model.config.dim
    head = nn.Linear(dim, 1, device=model.embed.weight.device, dtype=torch.float32)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, dim, generator=gen) / dim)
        head.bias.zero_()
    setattr(model, name, head)
    return head


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last True in attention_mask [B, T]: right under left padding, right padding, or
    none (the pitfall of reading the last column, or the first pad minus one, under the other padding)."""
    if not bool(attention_mask.any(1).all()):
        raise GemmalabError("a row has no real token to score")
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.long().flip(1).argmax(1)


def _hidden(model: nn.Module, tokens: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    return model(tokens, attention_mask=attention_mask, return_hidden=True)  # [B, T, D]


def sequence_scores(model: nn.Module, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    name: str = REWARD_HEAD) -> torch.Tensor:
    """The head `name` at each row's last real token: tokens, attention_mask [B, T] (True on real tokens; None: all
    real) -> fp32 [B]."""
    head = getattr(model, name, None)
    if head is None:
        raise GemmalabError(f"the model has no `{name}`; load a reward model (gemmalab.model.heads.load_scored)")
    mask = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    h = _hidden(model, tokens, attention_mask)
    last = h[torch.arange(h.shape[0], device=h.device), last_real_index(mask)]  # [B, D]
    return head(last.float()).squeeze(-1)


def right_padded(rows, pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens and attention mask [B, T] of id lists (T: the longest)."""
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[b, :len(r)] = True
    return tokens.to(device), mask.to(device)


@torch.no_grad()
def score_rows(model: nn.Module, rows, pad_id: int, batch_size: int = 32, name: str = REWARD_HEAD) -> list[float]:
    """The head `name` of each id list (its last token), in right-padded batches of `batch_size`, in eval mode."""
    from gemmalab.inference.engine import eval_mode

    device, out = model.embed.weight.device, []
    with eval_mode(model):
        for s in range(0, len(rows), batch_size):
            tokens, mask = right_padded(rows[s:s + batch_size], pad_id, device)
            out += sequence_scores(model, tokens, mask, name).tolist()
    return out


def token_values(model: nn.Module, hidden: torch.Tensor, name: str = VALUE_HEAD) -> torch.Tensor:
    """The head `name` at every position of hidden [B, T, D] -> fp32 [B, T] (PPO's value of each state)."""
    return getattr(model, name)(hidden.float()).squeeze(-1)


def split_head(state: dict[str, torch.Tensor], name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the trunk's state, the head's {"weight", "bias"}) of a full state dict holding `name.*` keys."""
    prefix = name + "."
    trunk = {k: v for k, v in state.items() if not k.startswith(prefix)}
    head = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return trunk, head


def save_head(head: dict[str, torch.Tensor], directory: str | Path, name: str = REWARD_HEAD) -> Path:
    """Write a head's tensors to DIRECTORY/<name>.safetensors (beside an exported model directory)."""
    from safetensors.torch import save_file

    if set(head) != {"weight", "bias"}:
        raise GemmalabError(f"a head has `weight` and `bias`, got {sorted(head)}")
    path = Path(directory) / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in head.items()}, str(path))
    return path


def load_scored(ref: str | Path, name: str = REWARD_HEAD, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu"):
    """(model with `model.<name>`, tokenizer) of a model directory that has DIRECTORY/<name>.safetensors (a run
    directory of `gemmalab reward` works too: its model/ is used)."""
    import gemmalab
    from safetensors.torch import load_file

    directory = Path(ref)
    if (directory / "model" / f"{name}.safetensors").is_file():
        directory = directory / "model"
    path = directory / f"{name}.safetensors"
    if not path.is_file():
        raise GemmalabError(f"{ref} is not a reward model: {path} is missing (train one with `gemmalab reward`)")
    model, tokenizer = gemmalab.load(directory, dtype=dtype, device=device)
    tensors = load_file(str(path))
    if tuple(tensors.get("weight", torch.empty(0)).shape) != (1, model.config.dim) or \
            tuple(tensors.get("bias", torch.empty(0)).shape) != (1,):
        raise GemmalabError(f"{path}: expected weight [1, {model.config.dim}] and bias [1], got "
                            f"{ {k: list(v.shape) for k, v in tensors.items()} }")
    head = add_head(model, name)
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])
    return model, tokenizer
