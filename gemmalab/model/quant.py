"""Weight-only int8 and int4 quantization for inference, on torch's own CPU and CUDA kernels (gpt-fast style).

    from gemmalab.model.quant import quantize
    quantize(model, "int8")                  # per-output-channel symmetric int8
    quantize(model, "int4", group_size=128)  # grouped asymmetric int4 (tinygemm layout)

Every nn.Linear in the blocks and the tied output projection (`x @ embed.weight.T`, installed as
`model.lm_head`) become an `Int8Linear` or `Int4Linear`. The embedding lookup keeps its full-precision table:
the quantized output projection is a second, compressed copy of it. Quantized models are for inference only;
`save_hf` refuses them.

Kernels and their constraints (torch 2.11-2.13):
- `torch._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N]) -> [M, N]` (CPU): x f32/f16/bf16 and
  scales of the *same* dtype as x. It costs about one weight pass per row of x, so for many rows (prefill)
  we dequantize and use F.linear instead. On CUDA torch's kernel is a naive one-thread-per-output loop, so
  there we always use `F.linear(x, w.to(x.dtype)) * scales`.
- int4, CPU: `torch._convert_weight_to_int4pack_for_cpu(q int32 [N, K] in 0..15, inner_k_tiles) -> uint8
  [N, K/2]` and `torch._weight_int4pack_mm_for_cpu(x [M, K], packed, group_size, scales_and_zeros)`; N a
  multiple of 16, x and scales_and_zeros of the same dtype.
- int4, CUDA (sm80+): `torch._convert_weight_to_int4pack(u8 [N, K/2] (even k in the high nibble),
  inner_k_tiles in {2, 4, 8}) -> int32 [N/8, K/(inner_k_tiles*16), 32, inner_k_tiles/2]` and
  `torch._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)`; x and scales_and_zeros must be bf16,
  N a multiple of 8, K a multiple of inner_k_tiles * 16.
- Both int4 kernels: group_size in {32, 64, 128, 256}, K a multiple of group_size, and scales_and_zeros
  [K / group_size, N, 2] holding (scale, zero) with w = (q - 8) * scale + zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemmalab.dtypes import cpu_bf16_fast
from gemmalab.errors import GemmalabError
from gemmalab.model.gemma import Gemma

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
NATIVE_GROUP_SIZE = 32  # GGUF's Q4_K sub-blocks and Q4_0 blocks: 32 weights per (scale, minimum)
# The int4 matmul always runs on bf16 activations: the CUDA kernel accepts nothing else, and on CPU the f32
# path is several times slower than bf16 at decode (an int4 weight's error dwarfs bf16 activation rounding).
INT4_COMPUTE_DTYPE = torch.bfloat16
# Rows of x up to which the CPU int8 kernel beats a dequantized matrix product: the kernel's cost grows about
# linearly with the rows (one weight pass each). Measured with 2 threads, torch 2.13: fp32 activations 4 (AVX512);
# bf16 activations 8 where bf16 is native (AMX: 40.7 ms against 39.4 for the 262144 x 640 output projection at 8
# rows, 157.6 against 44.5 at 32), 32 where the dequantized product has to run in fp32 (AVX512 without AMX).
INT8_KERNEL_MAX_ROWS = {torch.float32: 4, torch.bfloat16: 32}
INT8_KERNEL_MAX_ROWS_NATIVE_BF16 = 8
# Weights dequantized at a time in a many-row CPU product: a block of output channels stays in cache (the
# output projection dequantized whole would be 335 MB of bf16 written and read back per call).
DEQUANT_BLOCK_ELEMENTS = 1 << 22


# ---- int8: symmetric, one scale per output channel -------------------------------------------------------

def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q int8 [N, K], scales [N] in scale_dtype) with weight ~= q * scales[:, None].

    q is rounded against the stored (scale_dtype-rounded) scales, so the pair is self-consistent.
    """
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(scale_dtype)
    q = torch.round(w / scales.float()[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Reference dequantization, f32 [N, K]: q * scales[:, None]."""
    return q.float() * scales.float()[:, None]


def _int8_kernel_max_rows(dtype: torch.dtype) -> int:
    if dtype == torch.bfloat16 and cpu_bf16_fast():
        # Compiled (the Engine compiles quantized models with max-autotune), the int8 op at every row count: Inductor
        # puts its own AMX weight-only GEMM in its place (the output projection at 32 rows: 19.3 ms, against 139.8
        # for the dequantized product compiled and 51.0 eager).
        return 1 << 62 if torch.compiler.is_compiling() else INT8_KERNEL_MAX_ROWS_NATIVE_BF16
    return INT8_KERNEL_MAX_ROWS.get(dtype, 32)


def _blocked_dequantized_mm(x: torch.Tensor, q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [M, K] @ q.T -> [M, N] in `dtype`, q dequantized (unscaled) one block of output channels at a time
    into one reused buffer. The same arithmetic as F.linear(x, q.to(dtype)), column block by column block."""
    N, K = q.shape
    rows = max(1, DEQUANT_BLOCK_ELEMENTS // K)
    x = x.to(dtype)
    if N <= rows or x.requires_grad or torch.compiler.is_compiling():
        return F.linear(x, q.to(dtype))
    out = torch.empty(x.shape[0], N, dtype=dtype)
    block = torch.empty(rows, K, dtype=dtype)
    for start in range(0, N, rows):
        b = block[: min(rows, N - start)]
        b.copy_(q[start:start + rows])
        torch.mm(x, b.T, out=out[:, start:start + rows])
    return out


def _int8_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (q * scales).T -> [M, N] in x.dtype."""
    if x.device.type != "cpu":
        return F.linear(x, q.to(x.dtype)) * scales.to(x.dtype)
    if x.shape[0] <= _int8_kernel_max_rows(x.dtype) and not x.requires_grad:  # decode, short prompts (no backward)
        return torch._weight_int8pack_mm(x.contiguous(), q, scales.to(x.dtype))
    # A bf16 matrix product that is not native here is up to 100x slower than fp32: the many-row product in fp32.
    dtype = torch.float32 if x.dtype == torch.bfloat16 and not cpu_bf16_fast() else x.dtype
    return (_blocked_dequantized_mm(x, q, dtype) * scales.to(dtype)).to(x.dtype)


class Int8Linear(nn.Module):
    """Bias-free linear with an int8 weight [N, K] and per-output-channel scales [N]; activations in their own dtype."""

    def __init__(self, weight: torch.Tensor, scale_dtype: torch.dtype | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scales = quantize_int8(weight, scale_dtype or weight.dtype)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)  # follows model.to(dtype); cast to x.dtype if it differs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _int8_mm(x.reshape(-1, self.in_features), self.weight, self.scales)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# ---- int4: asymmetric, one (scale, zero) per group of group_size input channels -----------------------------

def quantize_int4(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype = INT4_COMPUTE_DTYPE
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q int32 [N, K] in 0..15, scales_and_zeros [K / group_size, N, 2] in scale_dtype).

    Per group: codes from min/max (step (max - min) / 15), then (step, offset) refit by least squares given
    those codes; stored as scale = step and zero = offset + 8 * step, so w ~= (q - 8) * scale + zero, the form
    both tinygemm kernels dequantize. q is rounded against the stored (rounded) scale and zero.
    """
    N, K = weight.shape
    groups = weight.detach().float().reshape(N, K // group_size, group_size)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (hi - lo).clamp(min=1e-6) / 15
    codes = torch.round((groups - lo) / step).clamp(0, 15)
    # Least-squares refit of w ~= codes * step + offset: on Gemma 3 270M (group 128) it more than halves the
    # perplexity increase of plain min/max rounding, at the cost of one more pass over the weight.
    codes_c, groups_c = codes - codes.mean(-1, keepdim=True), groups - groups.mean(-1, keepdim=True)
    var, cov = codes_c.pow(2).sum(-1, keepdim=True), (codes_c * groups_c).sum(-1, keepdim=True)
    step = torch.where((var > 0) & (cov > 0), cov / var.clamp(min=1e-12), step)
    offset = groups.mean(-1, keepdim=True) - step * codes.mean(-1, keepdim=True)
    scale = step.to(scale_dtype)
    zero = (offset + 8 * scale.float()).to(scale_dtype)
    q = torch.round((groups - zero.float()) / scale.float() + 8).clamp(0, 15).to(torch.int32).reshape(N, K)
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [K/g, N, 2]
    return q, scales_and_zeros


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reference dequantization shared by the CPU and CUDA paths, f32 [N, K]: (q - 8) * scale + zero per group."""
    N, K = q.shape
    sz = scales_and_zeros.float().transpose(0, 1)  # [N, K/g, 2]
    groups = q.float().reshape(N, K // group_size, group_size)
    return ((groups - 8) * sz[..., :1] + sz[..., 1:]).reshape(N, K)


def pack_int4_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q int32 [N, K] in 0..15 -> uint8 [N, K/2], even k in the high nibble: the CUDA packer's input format."""
    return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)


def int4_inner_k_tiles(in_features: int) -> int:
    """The largest inner_k_tiles (8, 4 or 2) the CUDA layout allows for K; 0 if none (K not a multiple of 32)."""
    return next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), 0)


def _int4_pack(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The device's packed weight layout for q int32 [N, K]."""
    if device.type == "cuda":
        return torch._convert_weight_to_int4pack(pack_int4_nibbles(q).to(device), int4_inner_k_tiles(q.shape[1]))
    return torch._convert_weight_to_int4pack_for_cpu(q.to(device), 8)  # the CPU layout ignores inner_k_tiles


def _int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] in INT4_COMPUTE_DTYPE, W the dequantized weight."""
    x = x.to(INT4_COMPUTE_DTYPE).contiguous()
    sz = scales_and_zeros.to(INT4_COMPUTE_DTYPE)
    if x.device.type == "cuda":
        return torch._weight_int4pack_mm(x, packed, group_size, sz)
    return torch._weight_int4pack_mm_for_cpu(x, packed, group_size, sz)


def int4_shape_problem(out_features: int, in_features: int, group_size: int, device: torch.device | str) -> str | None:
    """Why the int4 kernel of `device` cannot take a [out_features, in_features] weight, or None if it can."""
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return f"int4 has kernels for CPU and CUDA only, not {device.type}"
    if group_size not in INT4_GROUP_SIZES:
        return f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}"
    if in_features % group_size:
        return f"in_features {in_features} is not a multiple of group_size {group_size}"
    multiple = 8 if device.type == "cuda" else 16
    if out_features % multiple:
        return f"out_features {out_features} is not a multiple of {multiple} (the {device.type} int4 kernel's tile)"
    return None


class Int4Linear(nn.Module):
    """Bias-free linear with a grouped int4 weight in the kernel's packed layout (CPU or CUDA, fixed at build).

    Activations are cast to bf16 for the kernel (see INT4_COMPUTE_DTYPE) and the output back to x.dtype.
    """

    def __init__(self, weight: torch.Tensor, group_size: int = 128,
                 codes: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`codes`: (q, scales_and_zeros) as `quantize_int4` returns them, taken as they are (a file's own int4
        grid, gemmalab.checkpoint.gguf); else `weight` is quantized here."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        problem = int4_shape_problem(self.out_features, self.in_features, group_size, weight.device)
        if problem:
            raise GemmalabError(f"Cannot quantize a [{self.out_features}, {self.in_features}] weight to int4: {problem}.")
        self.group_size = group_size
        self.device_type = weight.device.type  # the packed layout differs between CPU and CUDA
        q, scales_and_zeros = codes if codes is not None else quantize_int4(weight, group_size)
        scales_and_zeros = scales_and_zeros.to(weight.device, INT4_COMPUTE_DTYPE)
        self.register_buffer("weight", _int4_pack(q, weight.device))
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [K / group_size, N, 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != self.device_type:
            raise GemmalabError(f"This int4 layer was packed for {self.device_type} but runs on {x.device.type}; "
                                f"quantize the model after moving it to the device it will run on.")
        y = _int4_mm(x.reshape(-1, self.in_features), self.weight, self.group_size, self.scales_and_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


# ---- whole model ----------------------------------------------------------------------------------------------

def is_quantized(model: Gemma) -> bool:
    """Whether `quantize` has been applied (it installs the quantized output projection as model.lm_head)."""
    return isinstance(model.lm_head, (Int8Linear, Int4Linear))


@torch.no_grad()
def quantize(model: Gemma, mode: str, group_size: int = 128,
             native: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Gemma:
    """In place: every nn.Linear in the blocks and the output projection become weight-only int8 or int4 modules.

    "int8": symmetric int8 with per-output-channel scales (`Int8Linear`); activations stay in the model dtype.
    "int4": asymmetric int4 in groups of `group_size` input channels (`Int4Linear`); the int4 matmul runs on
    bf16 activations, returning the model dtype. Quantize on the device the model will run on (the int4
    layout is device-specific). The output projection becomes `model.lm_head`; the embedding lookup keeps its
    full-precision table. Returns the model.

    `native` (int4 only): a quantized file's own int4 grid, parameter name ("layers.0.attn.o.weight",
    "embed.weight") -> (q, scales_and_zeros) in groups of NATIVE_GROUP_SIZE (gemmalab.checkpoint.gguf). Those
    layers take the file's codes as they are, so they compute the file's weights; the others, which the file stores
    at more than 4 bits, become int8 instead of being rounded to a coarser grid.

    Raises GemmalabError for an unknown mode, an already quantized model, or a layer the kernel cannot take
    (naming the layer and why); the model is unchanged then.
    """
    if mode not in MODES:
        raise GemmalabError(f"Unknown quantization mode {mode!r}; use one of {', '.join(MODES)}.")
    if model.lm_head is not None:
        raise GemmalabError("This model is already quantized (model.lm_head is set); quantize the original model.")
    linears = {f"layers.{name}": m for name, m in model.layers.named_modules() if isinstance(m, nn.Linear)}
    weights = {name: m.weight for name, m in linears.items()}
    weights["lm_head"] = model.embed.weight  # tied: logits = x @ embed.weight.T

    # Check every layer before changing any, so a failure leaves the model as it was.
    for name, m in linears.items():
        if m.bias is not None:
            raise GemmalabError(f"Cannot quantize {name}: it has a bias, which the quantized modules do not support.")
    if native is not None and mode != "int4":
        raise GemmalabError("`native` codes are int4 codes: quantize with mode int4.")

    def plan(name: str) -> tuple[str, tuple[torch.Tensor, torch.Tensor] | None]:
        """("int8", None), ("int4", None) to quantize here, or ("int4", the file's codes)."""
        if native is None:
            return mode, None
        given = native.get("embed.weight" if name == "lm_head" else f"{name}.weight")
        return ("int4", given) if given is not None else ("int8", None)  # not 4-bit in the file: int8

    plans = {name: plan(name) for name in weights}
    for name, (kind, given) in plans.items():
        if kind != "int4":
            continue
        w = weights[name]
        problem = int4_shape_problem(*w.shape, group_size if given is None else NATIVE_GROUP_SIZE, w.device)
        if problem:
            raise GemmalabError(f"Cannot quantize {name} [{w.shape[0]}, {w.shape[1]}] to int4: {problem}.")
        if given is not None and given[0].shape != w.shape:
            raise GemmalabError(f"The int4 codes of {name} are {tuple(given[0].shape)}, the weight {tuple(w.shape)}.")

    def build(name: str) -> nn.Module:
        kind, given = plans[name]
        if kind == "int8":
            return Int8Linear(weights[name])
        return Int4Linear(weights[name], group_size if given is None else NATIVE_GROUP_SIZE, given)

    for name in linears:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, build(name))
    model.lm_head = build("lm_head")
    return model


__all__ = ["Int4Linear", "Int8Linear", "dequantize_int4", "dequantize_int8", "is_quantized", "quantize",
           "quantize_int4", "quantize_int8"]
