"""Training metrics: model FLOPs per token and MFU, peak FLOP/s per device, memory, carbon. (The metrics.jsonl +
TensorBoard logger of a run directory is gemmalab.runs.MetricsLogger.)"""

from __future__ import annotations

import re
import resource
import time
from dataclasses import asdict, dataclass

import torch

from gemmalab.errors import GemmalabError
from gemmalab.model.config import ModelConfig


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6N + 12 * L * H * d_head * T.

    torchtitan's formula (training-anchors-facts.md §3, `torchtitan/models/utils.py:412-459`): N counts
    the tied embedding once, as the lm_head matmul ("nparams if enable_weight_tying"), so N is
    `config.num_params()`; d_head is config.head_dim (Gemma-7B: H * d_head != d). Causal sparsity is
    not discounted and sliding windows are not capped, so numbers compare with torchtitan's and with
    the fact sheet's gemma-2b figures (15.94 GF at T=2048, 18.66 GF at T=8192).
    """
    if seq_len <= 0:
        raise GemmalabError(f"seq_len must be positive, got {seq_len}.")
    c = config
    return 6.0 * c.num_params() + 12.0 * c.n_layers * c.n_heads * c.head_dim * seq_len


# Dense (no sparsity) bf16 tensor peak FLOP/s per device, from vendor spec sheets; first match wins,
# so the specific names come before the general ones. Sparsity figures (2x) are a known MFU pitfall.
PEAK_FLOPS: dict[str, float] = {
    "B200": 2.25e15,  # NVIDIA B200 (torchtitan tools/utils.py)
    "H100 PCIe": 756e12,  # NVIDIA H100 datasheet
    "H100 NVL": 835e12,  # NVIDIA H100 datasheet
    "GH200": 989e12,  # Hopper GPU of Grace Hopper: as H100 SXM
    "H200": 989e12,  # NVIDIA H200 datasheet (same Hopper compute as H100 SXM)
    "H100": 989e12,  # H100 SXM ("NVIDIA H100 80GB HBM3"), NVIDIA datasheet
    "A100": 312e12,  # NVIDIA A100 datasheet (SXM and PCIe)
    "L40S": 362e12,  # NVIDIA L40S datasheet (733 TF with sparsity)
    "L4": 121e12,  # NVIDIA L4 datasheet (242 TF with sparsity)
    "A10": 125e12,  # NVIDIA A10 datasheet (250 TF with sparsity); not the A10G, whose clocks differ
    "V100": 125e12,  # V100 SXM2 fp16 tensor (no bf16 on Volta)
    "T4": 65e12,  # T4 fp16 tensor (no bf16 on Turing)
    "MI300X": 1307e12,  # AMD Instinct MI300X datasheet
}

_measured_cpu: dict[tuple[torch.dtype, int], float] = {}


def _match_gpu(name: str) -> float | None:
    for key, value in PEAK_FLOPS.items():
        if re.search(r"(?<![A-Za-z0-9])" + re.escape(key) + r"(?![A-Za-z0-9])", name, re.IGNORECASE):
            return value
    return None


def measure_cpu_flops(dtype: torch.dtype = torch.float32, sizes: tuple[int, ...] = (256, 512, 1024, 2048),
                      repeats: int = 5, budget_s: float = 1.0) -> float:
    """The best matmul FLOP/s on this CPU at the current thread count: up to `repeats` products of each size, the
    best of all (so that a busy moment does not pass for the peak). Larger sizes are tried while the time spent
    stays under `budget_s` (bf16 without native support is 30x slower than fp32)."""
    best, start = 0.0, time.perf_counter()
    gen = torch.Generator().manual_seed(0)  # not the global RNG: a resumed run has just restored it
    for size in sizes:
        a = torch.randn(size, size, generator=gen).to(dtype)
        b = torch.randn(size, size, generator=gen).to(dtype)
        a @ b  # warm-up: thread pool, kernel selection
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2.0 * size**3 / (time.perf_counter() - t0))
            if time.perf_counter() - start > budget_s:
                return best
    return best


def peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, override: float | None = None) -> float:
    """Peak FLOP/s of one device: `override` if given; CUDA: the PEAK_FLOPS entry for its name (dense bf16);
    CPU: measured once per (dtype, threads) by a short matmul benchmark and cached (achieved, not a spec)."""
    if override is not None:
        if override <= 0:
            raise GemmalabError(f"peak FLOP/s override must be positive, got {override}.")
        return float(override)
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        value = _match_gpu(name)
        if value is None:
            raise GemmalabError(
                f"No peak FLOP/s known for GPU {name!r} (known: {', '.join(PEAK_FLOPS)}); "
                f"set the peak FLOP/s explicitly (dense bf16, from the vendor's spec sheet)."
            )
        return value
    if device.type == "cpu":
        key = (dtype, torch.get_num_threads())
        if key not in _measured_cpu:
            _measured_cpu[key] = measure_cpu_flops(dtype)
        return _measured_cpu[key]
    raise GemmalabError(f"No peak FLOP/s for device type {device.type!r}; set the peak FLOP/s explicitly.")


def mfu(tokens_per_s: float, flops_per_token: float, peak: float, measured: bool = False) -> float:
    """Model FLOPs utilisation as a fraction (0.4 = 40%): tokens/s per device x FLOPs/token / peak per device.

    `measured`: the peak is this machine's measured rate (CPU), not a spec; a step that achieves more than it
    shows the measurement fell short (a busy machine), so the peak is taken as at least the achieved rate.
    """
    if peak <= 0:
        raise GemmalabError(f"peak FLOP/s must be positive, got {peak}.")
    achieved = tokens_per_s * flops_per_token
    return achieved / (max(peak, achieved) if measured else peak)


def memory_stats(device: torch.device | str) -> dict[str, float]:
    """Peak memory in GB: CUDA allocated and reserved on `device`; CPU: the process's peak resident set."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"mem_peak_alloc_gb": torch.cuda.max_memory_allocated(device) / 1e9,
                "mem_peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}
    return {"mem_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}  # Linux: KiB


@dataclass
class CarbonConfig:
    """Energy and emissions estimate: energy = power x devices x time x PUE; CO2e = energy x grid intensity.

    Defaults: 700 W is the H100 SXM's maximum board power (NVIDIA datasheet; a step rarely draws all of it,
    so this is an upper bound); PUE 1.1 is about Google's fleet-wide trailing-twelve-month figure (Google
    Environmental Report 2024: 1.10; the industry average is far higher, ~1.5, Uptime Institute survey);
    0.48 kg CO2e/kWh is roughly the world average electricity carbon intensity for 2023 (Ember, Global
    Electricity Review 2024: ~480 g/kWh). Set all three for the actual site and hardware.
    """

    device_power_watts: float = 700.0
    num_devices: int = 1
    pue: float = 1.1
    grid_kg_co2e_per_kwh: float = 0.48

    def __post_init__(self) -> None:
        if self.device_power_watts < 0 or self.num_devices < 1 or self.pue < 1.0 or self.grid_kg_co2e_per_kwh < 0:
            raise GemmalabError(
                f"Invalid carbon config: need device_power_watts >= 0, num_devices >= 1, pue >= 1 and "
                f"grid_kg_co2e_per_kwh >= 0, got {asdict(self)}."
            )


def carbon(seconds: float, cfg: CarbonConfig) -> dict[str, float]:
    """The report's carbon row for `seconds` of wall-clock on cfg.num_devices devices."""
    if seconds < 0:
        raise GemmalabError(f"seconds must be >= 0, got {seconds}.")
    energy_kwh = cfg.device_power_watts * cfg.num_devices * seconds / 3600.0 / 1000.0 * cfg.pue
    return {
        "seconds": float(seconds),
        "device_hours": cfg.num_devices * seconds / 3600.0,
        "energy_kwh": energy_kwh,
        "co2e_kg": energy_kwh * cfg.grid_kg_co2e_per_kwh,
        **asdict(cfg),
    }
