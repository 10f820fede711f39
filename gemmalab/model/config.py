"""ModelConfig: every Gemma variant as plain fields, plus the published presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gemmalab.errors import GemmalabError

FAMILIES = ("gemma", "gemma2", "gemma3")


MAX_LAYERS = 4096  # far above any model (Gemma 2 27B: 46); a config.json saying 10**9 is broken


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one Gemma model. Variants differ only by these fields."""

    family: str = "gemma"  # "gemma" | "gemma2" | "gemma3": which HF config class we export to
    vocab_size: int = 256_000
    dim: int = 2048  # d_model
    n_layers: int = 18
    n_heads: int = 8
    n_kv_heads: int = 1  # 1: multi-query; n_heads: multi-head; between: grouped-query
    head_dim: int = 256
    ffn_dim: int = 16_384  # hidden width of each GeGLU branch (gate and up)
    max_seq_len: int = 8192
    norm_eps: float = 1e-6
    rope_theta: float = 10_000.0  # global layers
    rope_local_theta: float | None = None  # sliding-window layers; None: same as rope_theta
    rope_scaling: float = 1.0  # linear position scaling of global layers (Gemma 3 4B and up)
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5; None: head_dim
    attn_softcap: float | None = None  # Gemma 2: tanh(s / c) * c on attention scores
    final_softcap: float | None = None  # Gemma 2: the same on the output logits
    sliding_window: int | None = None  # keys a local layer sees: q_pos - k_pos < window
    sliding_pattern: int = 0  # 0: every layer global; N: layer i is global iff (i + 1) % N == 0
    post_norms: bool = False  # Gemma 2/3: RMSNorm on each sub-layer's output before the residual add
    qk_norm: bool = False  # Gemma 3: per-head RMSNorm on q and k before RoPE

    def __post_init__(self) -> None:
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems and self.n_layers > MAX_LAYERS:  # building 10**9 layers (even on meta) would hang
            problems.append(f"n_layers must be at most {MAX_LAYERS}, got {self.n_layers}")
        if not problems and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if not problems and self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.sliding_pattern < 0:
            problems.append(f"sliding_pattern must be >= 0, got {self.sliding_pattern}")
        if self.sliding_pattern and not self.sliding_window:
            problems.append("sliding_pattern is set but sliding_window is not")
        if self.sliding_window is not None and self.sliding_window <= 0:
            problems.append(f"sliding_window must be positive, got {self.sliding_window}")
        for name in ("attn_softcap", "final_softcap", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be positive or unset, got {value}")
        if self.rope_scaling <= 0 or self.rope_theta <= 0 or self.norm_eps <= 0:
            problems.append("rope_theta, rope_scaling and norm_eps must be positive")
        if problems:
            raise GemmalabError("Invalid model config: " + "; ".join(problems) + ".")

    def is_local(self, layer: int) -> bool:
        """Whether layer `layer` uses sliding-window attention."""
        return bool(self.sliding_pattern) and (layer + 1) % self.sliding_pattern != 0

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def num_params(self) -> int:
        """Parameter count with the tied embedding counted once."""
        d, hd = self.dim, self.head_dim
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads) + (2 * hd if self.qk_norm else 0)
        norms = d * (4 if self.post_norms else 2)
        layer = attn + 3 * d * self.ffn_dim + norms
        return self.vocab_size * d + self.n_layers * layer + d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> ModelConfig:
        """Build from a dict, refusing unknown fields (typos must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise GemmalabError(
                f"{source}: unknown model config field(s) {', '.join(unknown)}; known fields are {', '.join(sorted(known))}."
            )
        return cls(**data)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


_GEMMA2 = dict(family="gemma2", sliding_window=4096, sliding_pattern=2, attn_softcap=50.0, final_softcap=30.0, post_norms=True)
_GEMMA3 = dict(
    family="gemma3", vocab_size=262_144, max_seq_len=32_768, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
    sliding_pattern=6, post_norms=True, qk_norm=True,
)

PRESETS: dict[str, ModelConfig] = {
    # Gemma 1 and 1.1 (same shapes): multi-query 2B, multi-head 7B.
    "gemma-2b": ModelConfig(),
    "gemma-7b": ModelConfig(dim=3072, n_layers=28, n_heads=16, n_kv_heads=16, ffn_dim=24_576),
    "gemma2-2b": ModelConfig(dim=2304, n_layers=26, n_heads=8, n_kv_heads=4, ffn_dim=9216, **_GEMMA2),
    "gemma2-9b": ModelConfig(dim=3584, n_layers=42, n_heads=16, n_kv_heads=8, ffn_dim=14_336, **_GEMMA2),
    "gemma2-27b": ModelConfig(
        dim=4608, n_layers=46, n_heads=32, n_kv_heads=16, head_dim=128, ffn_dim=36_864, query_pre_attn_scalar=144, **_GEMMA2
    ),
    "gemma3-270m": ModelConfig(dim=640, n_layers=18, n_heads=4, n_kv_heads=1, ffn_dim=2048, sliding_window=512, **_GEMMA3),
    "gemma3-1b": ModelConfig(dim=1152, n_layers=26, n_heads=4, n_kv_heads=1, ffn_dim=6912, sliding_window=512, **_GEMMA3),
    # Tiny shapes for tests and CPU runs: same code paths, small windows so sliding attention is exercised.
    "tiny-gemma": ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16, ffn_dim=128, max_seq_len=256),
    "tiny-gemma2": ModelConfig(
        vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, max_seq_len=256,
        **{**_GEMMA2, "sliding_window": 8},
    ),
    "tiny-gemma3": ModelConfig(
        dim=64, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
        **{**_GEMMA3, "vocab_size": 512, "max_seq_len": 256, "sliding_window": 8, "sliding_pattern": 3},
    ),
}


def get_preset(name: str) -> ModelConfig:
    """The preset called `name`; a clear error lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise GemmalabError(f"Unknown model preset {name!r}; known presets: {', '.join(PRESETS)}.") from None
