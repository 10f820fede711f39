"""GGUF (llama.cpp) checkpoints of Gemma 1, 2 and 3, read through the `gguf` package."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import Q4_K, dequantize

from gemmalab.checkpoint.common import build_model
from gemmalab.errors import GemmalabError
from gemmalab.model import Gemma, ModelConfig
from gemmalab.model.quant import NATIVE_GROUP_SIZE

_ARCHS = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3"}
_BLOCK_NAMES = {
    "attn_norm": "attn_norm", "attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v", "attn_output": "attn.o",
    "attn_q_norm": "attn.q_norm", "attn_k_norm": "attn.k_norm", "post_attention_norm": "post_attn_norm",
    "ffn_norm": "mlp_norm", "ffn_gate": "mlp.gate", "ffn_up": "mlp.up", "ffn_down": "mlp.down",
    "post_ffw_norm": "post_mlp_norm",
}


class GGUFFormatError(ValueError):
    """A count or length in a GGUF header that cannot fit in the file (open_gguf names the file)."""


# The fewest bytes one item takes: a string its 8-byte length, an array its type and count, a key/value pair its
# key's length, its type and at least one byte of value, a tensor's info its name length, dims count, type, offset.
_MIN_STRING, _MIN_ARRAY, _MIN_KV, _MIN_TENSOR_INFO = 8, 12, 13, 24


class _ArrayFastReader(GGUFReader):
    """GGUFReader that reads metadata arrays in bulk, and refuses counts the file cannot hold.

    The stock reader makes several numpy views per array element; for a 262k-token vocabulary that is ~10 s.
    Here a scalar array is one numpy view and a string array two memoryview slices per string, which `contents()` reads as
    before (whole-field `contents()` only: `contents(i)` of a scalar array is not supported).

    Reads past the end of a memory map give empty slices, not errors, so a hostile count (2**60 strings) would
    loop and allocate for ever: every count and length is checked against the bytes left first.
    """

    def _fits(self, offs: int, count: int, item_bytes: int, what: str, noun: str = "a count") -> None:
        left = max(0, len(self.data) - offs)
        if count * item_bytes > left:
            raise GGUFFormatError(f"{what}: {noun} of {count:,} cannot fit in the {left:,} bytes left in the file")

    def _build_fields(self, offs, count):
        count = int(count)
        self._fits(offs, count, _MIN_KV, "GGUF.kv_count")
        for _ in range(count):  # one key at a time, so that an error names its key
            self._fits(offs, 1, _MIN_STRING, "metadata key", "a key")
            klen = int(self._get(offs, np.uint64)[0])
            self._fits(offs + _MIN_STRING, klen, 1, "metadata key", "a length")
            key = bytes(self.data[offs + 8:offs + 8 + klen]).decode("utf-8", "replace")
            try:
                offs = super()._build_fields(offs, 1)
            except GGUFFormatError as e:
                raise GGUFFormatError(f"metadata key {key!r}: {e}") from None
        return offs

    def _build_tensor_info(self, offs, count):
        self._fits(offs, int(count), _MIN_TENSOR_INFO, "GGUF.tensor_count")
        return super()._build_tensor_info(offs, count)

    def _get_field_parts(self, orig_offs, raw_type):
        if GGUFValueType(raw_type) != GGUFValueType.ARRAY:
            if GGUFValueType(raw_type) == GGUFValueType.STRING:
                self._fits(orig_offs, 1, _MIN_STRING, "string", "a string")
                self._fits(orig_offs + _MIN_STRING, int(self._get(orig_offs, np.uint64)[0]), 1, "string", "a length")
            return super()._get_field_parts(orig_offs, raw_type)
        self._fits(orig_offs, 1, _MIN_ARRAY, "array", "an array")
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, count, offs = GGUFValueType(raw_itype[0]), int(alen[0]), orig_offs + 12
        nptype = self.gguf_scalar_to_np.get(itype)
        item_bytes = np.dtype(nptype).itemsize if nptype is not None else \
            _MIN_STRING if itype == GGUFValueType.STRING else _MIN_ARRAY
        self._fits(offs, count, item_bytes, f"array of {itype.name}")
        if self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        if nptype is not None:
            values = self._get(offs, nptype, count)
            return 12 + int(values.nbytes), [raw_itype, alen, values], [2], [GGUFValueType.ARRAY, itype]
        if itype != GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        parts, data, buf = [raw_itype, alen], [], memoryview(self.data)  # memoryview slices are cheap
        for i in range(count):
            end = offs + 8 + int.from_bytes(buf[offs:offs + 8], "little")
            if end > len(buf):  # also when fewer than the 8 bytes of its length are left
                raise GGUFFormatError(f"string {i} of the array (length {end - offs - 8:,}) runs past the end of "
                                      f"the file")
            parts += [buf[offs:offs + 8], buf[offs + 8:end]]  # like numpy parts: .nbytes and .tobytes()
            data.append(len(parts) - 1)
            offs = end
        return offs - orig_offs, parts, data, [GGUFValueType.ARRAY, GGUFValueType.STRING]


def open_gguf(path: str | Path) -> GGUFReader:
    """A GGUFReader, or a clear error for a missing, truncated or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise GemmalabError(f"{path} does not exist or is not a file.")
    try:
        return _ArrayFastReader(path)
    except GGUFFormatError as e:
        raise GemmalabError(f"{path} is not a readable GGUF file: {e}.") from None
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on damaged files
        raise GemmalabError(f"{path} is not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}.") from None


def field(reader: GGUFReader, key: str, default=None):
    """The value of a metadata key, or `default` when absent."""
    f = reader.fields.get(key)
    try:
        return default if f is None else f.contents()
    except UnicodeDecodeError as e:  # strings are decoded only when read
        source = getattr(reader.data, "filename", "<GGUF>")
        raise GemmalabError(f"{source}: metadata key {key} holds text that is not UTF-8 ({e}).") from None


def gguf_config(reader: GGUFReader, source: str) -> ModelConfig:
    """ModelConfig from GGUF metadata (`{arch}.block_count` etc.) and the embedding's shape."""
    arch = field(reader, "general.architecture")
    family = _ARCHS.get(arch) if isinstance(arch, str) else None
    if family is None:
        raise GemmalabError(f"{source}: general.architecture is {arch!r:.80}; gemmalab reads gemma, gemma2 and gemma3 "
                            f"GGUF files.")

    def need(key):
        value = field(reader, f"{arch}.{key}")
        if value is None:
            raise GemmalabError(f"{source}: metadata key {arch}.{key} is missing.")
        return value

    def count(key, default=None):
        """A size or count: a whole number >= 1 (0 heads would divide by zero, a string is no size)."""
        value = need(key) if default is None else field(reader, f"{arch}.{key}", default)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise GemmalabError(f"{source}: metadata key {arch}.{key} must be a whole number >= 1, got {value!r:.80}.")
        return int(value)

    def number(key, default):
        """A real-valued setting (epsilon, rope base, soft-cap): a finite number (a string or list is none)."""
        value = field(reader, f"{arch}.{key}", default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise GemmalabError(f"{source}: metadata key {arch}.{key} must be a finite number, got {value!r:.80}.")
        return value

    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise GemmalabError(f"{source}: tensor token_embd.weight is missing.")
    if len(embed.shape) != 2:
        raise GemmalabError(f"{source}: tensor token_embd.weight has shape {embed.shape.tolist()}; expected [dim, vocab].")
    dim, n_heads, n_layers = count("embedding_length"), count("attention.head_count"), count("block_count")
    head_dim = count("attention.key_length", dim // n_heads)
    # GGUF does not store query_pre_attn_scalar; the 27B models use d_model / heads, the others head_dim.
    big = (family == "gemma2" and n_layers == 46) or (family == "gemma3" and n_layers == 62)
    local = family != "gemma"
    values = dict(
        family=family,
        vocab_size=int(embed.shape[1]),  # ggml order: [dim, vocab]
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=count("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        ffn_dim=count("feed_forward_length"),
        max_seq_len=count("context_length"),
        norm_eps=_f32(number("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(number("rope.freq_base", 1e6 if family == "gemma3" else 1e4)),
        rope_local_theta=10_000.0 if family == "gemma3" else None,
        rope_scaling=float(number("rope.scaling.factor", 1.0) or 1.0),
        query_pre_attn_scalar=dim / n_heads if big else None,
        attn_softcap=number("attn_logit_softcapping", 50.0 if family == "gemma2" else None),
        final_softcap=number("final_logit_softcapping", 30.0 if family == "gemma2" else None),
        sliding_window=count("attention.sliding_window") if local else None,
        sliding_pattern={"gemma": 0, "gemma2": 2, "gemma3": 6}[family],
        post_norms=local,
        qk_norm=family == "gemma3",
    )
    try:
        return ModelConfig(**values)
    except GemmalabError as e:  # ModelConfig's own checks: heads a multiple of kv heads, an even head_dim
        raise GemmalabError(f"{source}: {e}") from None


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999997e-07 -> 1e-06)."""
    return float(f"{value:.7g}")


def _our_name(name: str) -> str | None:
    if name == "token_embd.weight":
        return "embed.weight"
    if name == "output_norm.weight":
        return "norm.weight"
    if name == "output.weight":  # a copy of the tied embedding that some converters write
        return None
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    return name  # reported as unexpected by build_model


def gguf_tensors(reader: GGUFReader, source: str) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to f32 under our parameter names; norms back to zero-centred weights."""
    out = {}
    for t in reader.tensors:
        name = _our_name(t.name)
        if name is None:
            continue
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GemmalabError(f"{source}: tensor {t.name} uses quantization type {t.tensor_type.name}, "
                                f"which the gguf package cannot dequantize.") from None
        tensor = torch.from_numpy(np.array(array, dtype=np.float32))  # owned, writable copy
        if name.endswith("norm.weight"):
            tensor = tensor - 1.0  # llama.cpp's converter stores 1 + w
        out[name] = tensor.reshape(tuple(int(d) for d in reversed(t.shape)))
    return out


def _q4_k_codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks [B, 144] -> (codes [B, 8, 32] in 0..15, scale [B, 8], minimum [B, 8]): 8 sub-blocks of
    32 weights each, w = scale * code - minimum (the layout gguf.quants.Q4_K dequantizes)."""
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [B, 1]
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (qs & 0x0F).reshape(-1, 8, 32), d * sc.astype(np.float32), dmin * m.astype(np.float32)


def _q4_0_codes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_0 blocks [B, 18] -> (codes [B, 1, 32], scale [B, 1], minimum [B, 1]): w = d * (code - 8)."""
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 2:].reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)
    return (qs & 0x0F).reshape(-1, 1, 32), d, 8 * d


_INT4_TYPES = {GGMLQuantizationType.Q4_K: (144, _q4_k_codes), GGMLQuantizationType.Q4_0: (18, _q4_0_codes)}


def gguf_int4_codes(reader: GGUFReader) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The file's own 4-bit grid of its Q4_K and Q4_0 matrices, in the form of gemmalab.model.quant's int4 (groups
    of 32 input channels): our parameter name -> (q int32 [N, K] in 0..15, scales_and_zeros f32 [K / 32, N, 2]),
    w = (q - 8) * scale + zero with zero = 8 * scale - minimum, which is the file's dequantized weight. Other
    types (Q5_0, Q6_K, Q8_0, floats) are not in the map."""
    out = {}
    for t in reader.tensors:
        name = _our_name(t.name)
        if name is None or t.tensor_type not in _INT4_TYPES or len(t.shape) != 2:
            continue
        size, unpack = _INT4_TYPES[t.tensor_type]
        K, N = (int(d) for d in t.shape)
        codes, scale, minimum = unpack(np.asarray(t.data, dtype=np.uint8).reshape(-1, size))
        q = torch.from_numpy(codes.astype(np.int32).reshape(N, K))
        scale = torch.from_numpy(scale.reshape(N, K // NATIVE_GROUP_SIZE))
        zero = 8 * scale - torch.from_numpy(minimum.reshape(N, K // NATIVE_GROUP_SIZE))
        out[name] = (q, torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous())
    return out


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Gemma, GGUFReader]:
    """A Gemma from a GGUF file, with the reader (its tokenizer vocabulary is read from it)."""
    reader = open_gguf(path)
    config = gguf_config(reader, str(path))
    return build_model(config, gguf_tensors(reader, str(path)), str(path), dtype, device), reader
