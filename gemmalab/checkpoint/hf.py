"""Hugging Face layout: config.json that transformers reads, sharded safetensors with an index."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gemmalab.checkpoint.common import build_model, check_layer_count
from gemmalab.errors import GemmalabError
from gemmalab.model import Gemma, ModelConfig

_HF = {"gemma": ("gemma", "GemmaForCausalLM"), "gemma2": ("gemma2", "Gemma2ForCausalLM"),
       "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}
_SPECIAL = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}


def hf_name(name: str, family: str) -> str:
    """Our parameter name -> the transformers name (GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM)."""
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    _, i, rest = name.split(".", 2)
    mlp_norm = "post_attention_layernorm" if family == "gemma" else "pre_feedforward_layernorm"
    rest = {
        "attn_norm.weight": "input_layernorm.weight",
        "mlp_norm.weight": f"{mlp_norm}.weight",
        "post_attn_norm.weight": "post_attention_layernorm.weight",
        "post_mlp_norm.weight": "post_feedforward_layernorm.weight",
        "attn.q_norm.weight": "self_attn.q_norm.weight",
        "attn.k_norm.weight": "self_attn.k_norm.weight",
    }.get(rest) or rest.replace("attn.", "self_attn.").replace(".weight", "_proj.weight")
    return f"model.layers.{i}.{rest}"


def _check_exportable(c: ModelConfig) -> None:
    expected = {"gemma": (False, False), "gemma2": (True, False), "gemma3": (True, True)}[c.family]
    if (c.post_norms, c.qk_norm) != expected:
        raise GemmalabError(
            f"This config (family {c.family}, post_norms={c.post_norms}, qk_norm={c.qk_norm}) has no transformers "
            f"equivalent: {c.family} needs post_norms={expected[0]}, qk_norm={expected[1]}."
        )
    if c.family == "gemma" and (c.sliding_pattern or c.attn_softcap or c.final_softcap or c.query_pre_attn_scalar):
        raise GemmalabError("Family gemma (Gemma 1) has no sliding window, soft-capping or query_pre_attn_scalar; "
                            "use family gemma2 or gemma3 for those.")


def to_hf_config(c: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for transformers' Gemma, Gemma2 or Gemma3Text config class."""
    _check_exportable(c)
    model_type, arch = _HF[c.family]
    out = {
        "architectures": [arch], "model_type": model_type, "vocab_size": c.vocab_size, "hidden_size": c.dim,
        "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "tie_word_embeddings": True,
        "attention_bias": False, "torch_dtype": str(dtype).removeprefix("torch."), **_SPECIAL,
    }
    if c.family == "gemma":
        out["hidden_act"] = out["hidden_activation"] = "gelu_pytorch_tanh"
        return out
    out.update(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim,
        sliding_window=c.sliding_window,
        attn_logit_softcapping=c.attn_softcap,
        final_logit_softcapping=c.final_softcap,
        layer_types=["sliding_attention" if c.is_local(i) else "full_attention" for i in range(c.n_layers)],
    )
    if c.family == "gemma3":
        out["rope_local_base_freq"] = c.rope_local_theta or c.rope_theta
        out["rope_scaling"] = {"rope_type": "linear", "factor": c.rope_scaling} if c.rope_scaling != 1.0 else None
    return out


def _sliding_pattern(layer_types: list[str], source: str) -> int:
    """The n of "every n-th layer is global" that `layer_types` follows (0: all global), in one pass."""
    full = [t == "full_attention" for t in layer_types]
    if all(full):
        return 0
    n = full.index(True) + 1 if any(full) else len(full) + 1  # the first global layer fixes n
    if n < 2 or any(f != ((i + 1) % n == 0) for i, f in enumerate(full)):
        raise GemmalabError(f"{source}: layer_types {str(layer_types)[:200]} is not a repeating local/global pattern "
                            f"gemmalab supports.")
    return n


def _scalar(value, head_dim) -> float | None:
    """query_pre_attn_scalar, or None when it is the default (head_dim)."""
    return None if value is None or value == head_dim else float(value)


_REQUIRED = object()


class _Fields:
    """Typed reads of a config.json object: a missing or mistyped field is a GemmalabError naming it (a string where
    a size belongs, a list where an object belongs, 3.7 layers). None counts as absent, as transformers writes it."""

    def __init__(self, cfg: dict, source: str) -> None:
        self.cfg, self.source = cfg, source

    def get(self, key: str, kind: type, default=_REQUIRED, table: dict | None = None):
        value = (self.cfg if table is None else table).get(key)
        if value is None:
            if default is _REQUIRED:
                raise GemmalabError(f"{self.source}: required field {key!r} is missing.")
            return default
        numeric = kind in (int, float) and isinstance(value, bool)  # JSON true is no size
        if numeric or not isinstance(value, (int, float) if kind is float else kind) or (
                kind is float and not math.isfinite(value)):  # Python's json reads NaN and Infinity
            raise GemmalabError(f"{self.source}: field {key!r} must be {_KIND_NAMES[kind]}, got {value!r:.80}.")
        return float(value) if kind is float else value

    def table(self, key: str, table: dict | None = None) -> dict:
        return self.get(key, dict, {}, table)


_KIND_NAMES = {int: "a whole number", float: "a finite number", str: "a string", list: "a list", dict: "an object"}


def from_hf_config(cfg: dict, source: str = "config.json") -> ModelConfig:
    """ModelConfig from a transformers config dict (gemma, gemma2, gemma3_text, or gemma3 with a text_config)."""
    if not isinstance(cfg, dict):
        raise GemmalabError(f"{source} must hold a JSON object.")
    if cfg.get("model_type") == "gemma3" and "text_config" in cfg:
        cfg = {"model_type": "gemma3_text", **_Fields(cfg, source).table("text_config")}
    model_type = cfg.get("model_type")
    family = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}.get(model_type) \
        if isinstance(model_type, str) else None
    if family is None:
        raise GemmalabError(f"{source}: model_type {model_type!r:.80} is not a Gemma model (expected gemma, gemma2 or "
                            f"gemma3_text).")
    f = _Fields(cfg, source)
    rope = f.table("rope_parameters")
    full, local = f.table("full_attention", rope) or rope, f.table("sliding_attention", rope)
    scaling = f.table("rope_scaling") or (full if full.get("rope_type") == "linear" else {})
    n_layers, heads, head_dim = f.get("num_hidden_layers", int), f.get("num_attention_heads", int), f.get("head_dim", int, 256)
    layer_types = f.get("layer_types", list, None)
    if layer_types is not None and (len(layer_types) != n_layers or
                                    not all(t in ("full_attention", "sliding_attention") for t in layer_types)):
        raise GemmalabError(f"{source}: layer_types must list 'full_attention' or 'sliding_attention' for each of the "
                            f"{n_layers} layers, got {str(layer_types)[:200]}.")
    if family == "gemma":
        sliding_pattern = 0
    elif layer_types is not None:
        sliding_pattern = _sliding_pattern(layer_types, source)
    else:  # every n-th layer global (n = 2 in Gemma 2); with fewer than n layers, all are local
        n = 2 if family == "gemma2" else f.get("sliding_window_pattern", int, 6)
        sliding_pattern = 0 if n <= 1 else n if n <= n_layers else n_layers + 1
    values = dict(
        family=family,
        vocab_size=f.get("vocab_size", int),
        dim=f.get("hidden_size", int),
        n_layers=n_layers,
        n_heads=heads,
        n_kv_heads=f.get("num_key_value_heads", int, heads),
        head_dim=head_dim,  # 256: the HF Gemma config default
        ffn_dim=f.get("intermediate_size", int),
        max_seq_len=f.get("max_position_embeddings", int, 8192),
        norm_eps=f.get("rms_norm_eps", float, 1e-6),
        rope_theta=f.get("rope_theta", float, None, full) or f.get("rope_theta", float,
                                                                   1e6 if family == "gemma3" else 1e4),
        rope_local_theta=(f.get("rope_theta", float, None, local) or f.get("rope_local_base_freq", float, 1e4))
        if family == "gemma3" else None,
        rope_scaling=f.get("factor", float, 1.0, scaling),
        query_pre_attn_scalar=_scalar(f.get("query_pre_attn_scalar", float, None), head_dim)
        if family != "gemma" else None,
        attn_softcap=f.get("attn_logit_softcapping", float, 50.0 if family == "gemma2" else None),
        final_softcap=f.get("final_logit_softcapping", float, 30.0 if family == "gemma2" else None),
        sliding_window=f.get("sliding_window", int, 4096) if family != "gemma" else None,
        sliding_pattern=sliding_pattern,
        post_norms=family != "gemma",
        qk_norm=family == "gemma3",
    )
    try:
        return ModelConfig(**values)
    except GemmalabError as e:  # ModelConfig's own checks (a multiple of n_kv_heads, sizes >= 1)
        raise GemmalabError(f"{source}: {e}") from None


def read_model_json(path: Path) -> dict:
    """A JSON object file of a model directory (config.json, the safetensors index); errors name the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GemmalabError(f"{path} is missing; a model directory needs config.json and safetensors weights.") from None
    except ValueError as e:  # bad JSON or UTF-8, or an integer over Python's 4,300-digit limit
        raise GemmalabError(f"{path} is not valid JSON: {e}.") from None
    except RecursionError:
        raise GemmalabError(f"{path} is not valid JSON here: nested too deeply.") from None
    if not isinstance(data, dict):
        raise GemmalabError(f"{path} must hold a JSON object.")
    return data


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_model_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise GemmalabError(f"{index} has no weight_map object naming the weight files.")
        for name, file in weight_map.items():  # file names in this folder: an index cannot point elsewhere
            if not isinstance(file, str) or Path(file).name != file or file == "..":
                raise GemmalabError(f"{index}: weight_map[{name!r:.80}] must be a file name in {directory}, "
                                    f"got {file!r:.80}.")
        return [directory / f for f in sorted(set(weight_map.values()))]
    single = directory / "model.safetensors"
    if not single.exists():
        raise GemmalabError(f"{directory} has neither model.safetensors nor model.safetensors.index.json.")
    return [single]


def read_safetensors(paths: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of these safetensors files; a truncated or corrupt file is a clear error."""
    tensors = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except FileNotFoundError:
            raise GemmalabError(f"{path} is listed in the index but does not exist.") from None
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise GemmalabError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}.") from None
    return tensors


def load_hf(directory: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Gemma:
    """A Gemma from a Hugging Face model directory."""
    directory = Path(directory)
    config = from_hf_config(read_model_json(directory / "config.json"), str(directory / "config.json"))
    raw = read_safetensors(_weight_files(directory))
    check_layer_count(config, raw, str(directory))
    names = hf_to_ours(config)
    tensors = {}
    for key, t in raw.items():
        if key == "lm_head.weight":  # tied to the embedding; some exporters write it anyway
            continue
        tensors[names.get(key, key)] = t
    return build_model(config, tensors, str(directory), dtype, device)


def hf_to_ours(config: ModelConfig) -> dict[str, str]:
    """HF name -> our name for every parameter of a model with this config."""
    with torch.device("meta"):
        model = Gemma(config)
    return {hf_name(n, config.family): n for n, _ in model.named_parameters()}


def save_hf(model: Gemma, directory: str | Path, tokenizer=None, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write `model` (and `tokenizer` if given) as a Hugging Face model directory that transformers loads."""
    if model.lm_head is not None:
        raise GemmalabError("This model is quantized for inference; save the unquantized model instead.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    c = model.config
    dtype = next(model.parameters()).dtype
    config = to_hf_config(c, dtype)
    tensors = {hf_name(n, c.family): p.detach().contiguous().cpu() for n, p in model.named_parameters()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for old in list(directory.glob("model*.safetensors")) + list(directory.glob("model.safetensors.index.json")):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, directory / fname, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": 2, "eos_token_id": [1, tokenizer.end_of_turn_id] if tokenizer else 1, "pad_token_id": 0}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer is not None:
        tokenizer.save(directory)
    else:  # an earlier model's tokenizer would be taken for this one's
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            (directory / name).unlink(missing_ok=True)
    return directory
