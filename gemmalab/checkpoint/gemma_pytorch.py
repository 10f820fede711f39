"""gemma_pytorch `.ckpt` files (google/gemma_pytorch): fused qkv, optional int8 weights with row scalers."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from gemmalab.checkpoint.common import build_model
from gemmalab.checkpoint.hf import hf_to_ours
from gemmalab.errors import GemmalabError
from gemmalab.model import Gemma, ModelConfig


def read_gemma_pytorch(path: str | Path) -> dict[str, torch.Tensor]:
    """The plain tensors of a gemma_pytorch checkpoint; never unpickles anything but tensors."""
    path = Path(path)
    if not path.is_file():
        raise GemmalabError(f"{path} does not exist or is not a file.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        raise GemmalabError(
            f"{path} holds more than plain tensors, and gemmalab refuses to unpickle arbitrary objects "
            f"(torch.load weights_only=True said: {str(e).splitlines()[0]})."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise GemmalabError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}.") from None
    state = data.get("model_state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GemmalabError(f"{path} is not a gemma_pytorch checkpoint: expected a dict of tensors under 'model_state_dict'.")
    return state


def gemma_pytorch_tensors(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """gemma_pytorch names -> ours: split qkv rows (Q, K, V in that order), dequantize int8 weights."""
    ours = _names_by_gp(config)
    out = {}
    for key, t in state.items():
        if "freqs_cis" in key or key.endswith("weight_scaler"):
            continue  # RoPE tables are recomputed; scalers are applied below
        scaler = state.get(key.removesuffix("weight") + "weight_scaler")
        if scaler is not None:
            t = t.float() * scaler.float()[:, None]
        if key.endswith("self_attn.qkv_proj.weight"):
            q_size, kv_size = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
            if t.shape[0] != q_size + 2 * kv_size:
                raise GemmalabError(f"{key} has {t.shape[0]} rows; the config expects {q_size + 2 * kv_size} "
                                    f"({config.n_heads} query and {config.n_kv_heads} key/value heads of {config.head_dim}).")
            prefix = key.removesuffix("qkv_proj.weight")
            for part, rows in zip("qkv", t.split([q_size, kv_size, kv_size])):
                out[ours.get(f"{prefix}{part}_proj.weight", f"{prefix}{part}_proj.weight")] = rows
        else:
            out[ours.get(key, key)] = t
    return out


def _names_by_gp(config: ModelConfig) -> dict[str, str]:
    """gemma_pytorch name -> our name: the HF names with `embedder` and query_norm/key_norm spellings."""
    respell = (("model.embed_tokens.", "embedder."), ("self_attn.q_norm", "self_attn.query_norm"),
               ("self_attn.k_norm", "self_attn.key_norm"))
    gp = {}
    for hf, ours in hf_to_ours(config).items():
        for old, new in respell:
            hf = hf.replace(old, new)
        gp[hf] = ours
    return gp


def load_gemma_pytorch(path: str | Path, config: ModelConfig, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> Gemma:
    """A Gemma from a gemma_pytorch `.ckpt`; the file has no config, so the preset must be given."""
    tensors = gemma_pytorch_tensors(read_gemma_pytorch(path), config)
    return build_model(config, tensors, str(path), dtype, device)
