"""One dtype vocabulary for configs, the command line and the Python API: `fp32` / `float32`, `bf16` / `bfloat16`,
`fp16` / `float16` (either spelling, or a torch.dtype), and `auto`: bf16 on CUDA and on CPUs that run bf16 matrix
products natively and fast (AVX512-BF16 or AMX, confirmed by a short timing), fp32 on other CPUs, where a bf16
matrix product can run up to 100x slower than fp32 (bench/RESULTS.md)."""

from __future__ import annotations

import functools
import logging
import os
import platform
import time

import torch

from gemmalab.errors import GemmalabError

__all__ = ["DTYPES", "DTYPE_CHOICES", "parse_dtype", "dtype_name", "auto_dtype", "cpu_bf16_fast"]

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
DTYPE_CHOICES = (*DTYPES, "auto")
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def parse_dtype(value: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """The torch dtype a name (either spelling) or dtype stands for; "auto" is `auto_dtype(device)`; anything else
    is a GemmalabError."""
    if isinstance(value, torch.dtype):
        if value not in _SHORT:
            raise GemmalabError(f"Unsupported dtype {value}; use one of {', '.join(DTYPE_CHOICES)}.")
        return value
    if isinstance(value, str) and value.lower() == "auto":
        return auto_dtype(device)
    if not isinstance(value, str) or value.lower() not in DTYPES:
        raise GemmalabError(f"Unknown dtype {value!r}; use one of {', '.join(DTYPE_CHOICES)}.")
    return DTYPES[value.lower()]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name configs are written with: fp32, bf16, fp16."""
    return _SHORT[parse_dtype(dtype)]


def auto_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bf16 on CUDA and on a CPU where `cpu_bf16_fast()`, else fp32. Without a device: CUDA if there is one."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.bfloat16
    chosen = torch.bfloat16 if kind == "cpu" and cpu_bf16_fast() else torch.float32
    _say(kind, chosen)
    return chosen


@functools.cache
def _say(kind: str, chosen: torch.dtype) -> None:  # once per process and choice
    why = "this CPU runs bf16 matrix products natively and faster than fp32" if chosen == torch.bfloat16 else \
        "bf16 matrix products are not native and fast here"
    log.info("dtype auto on %s: %s (%s)", kind, dtype_name(chosen), why)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_description() -> str:
    """The CPU's model name and the flags that decide its fast paths, e.g. "AMD EPYC 7B13 (avx2, fma)", for benchmark
    records (machines differ)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    kinds = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
             if f in cpu_flags()]
    return f"{name} ({', '.join(kinds) or 'none of avx2, avx512, amx'})"


def _matmul_seconds(dtype: torch.dtype, n: int = 512, repeats: int = 3) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up: kernels chosen, pages touched
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return best


@torch.compiler.assume_constant_result  # torch.compile takes the answer as a constant, not a graph break per call
def cpu_bf16_fast() -> bool:
    """Whether this CPU runs bf16 matrix products natively and at least as fast as fp32: its flags name avx512_bf16
    or amx_bf16 and a 512 x 512 product (best of 3, about a millisecond) agrees. Once per process
    (`_cpu_bf16_probe.cache_clear()` asks again). GEMMALAB_CPU_BF16=1 or 0 decides instead (tests, or a machine the
    probe misjudges)."""
    return _cpu_bf16_probe()


@functools.cache
def _cpu_bf16_probe() -> bool:
    forced = os.environ.get("GEMMALAB_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if not cpu_flags() & NATIVE_BF16_FLAGS:
        return False
    return _matmul_seconds(torch.bfloat16) <= _matmul_seconds(torch.float32)
