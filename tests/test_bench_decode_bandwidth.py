"""bench/decode_bandwidth.py's logic on CPU with a tiny preset (its real use is on a GPU, which CI lacks)."""

import importlib.util
from pathlib import Path

from gemmalab.model import Gemma, get_preset


def test_bandwidth_figures_are_bytes_per_token_times_tokens_per_second():
    path = Path(__file__).resolve().parent.parent / "bench" / "decode_bandwidth.py"
    spec = importlib.util.spec_from_file_location("decode_bandwidth", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.measure("tiny-gemma", device="cpu", dtype="float32", new_tokens=6, prompt_len=4, copy_gib=0.01)
    weights = sum(p.numel() for p in Gemma(get_preset("tiny-gemma")).parameters()) * 4
    assert weights < r["bytes_per_token"] < 1.1 * weights  # the weights and a little KV cache
    assert r["tok_s"] > 0 and r["copy_gb_s"] > 0
    assert abs(r["achieved_gb_s"] - r["bytes_per_token"] * r["tok_s"] / 1e9) < 0.05 + 0.01 * r["achieved_gb_s"]
    assert abs(r["fraction_of_copy"] - r["achieved_gb_s"] / r["copy_gb_s"]) < 0.01 + 0.01 * r["fraction_of_copy"]
