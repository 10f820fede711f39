"""LoRA against full fine-tuning of the real Gemma 3 270M on the built-in dialogues ([sft] check).

    .venv/bin/python bench/sft_lora.py [--steps 40] [--compare-steps 6] [--out bench/out/sft]

Runs `gemmalab sft --config configs/sft/gemma3-270m-lora.toml` for --steps (held-out accuracy, answer loss and the
share of answers ended with <end_of_turn>, before and after), then the same config for --compare-steps with LoRA and
with full fine-tuning, each in a process of its own, and reports their median time per step (after the first) and
peak resident memory. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sft" / "gemma3-270m-lora.toml"


def run_sft(out: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "gemmalab", "sft", "--config", str(CONFIG), "--out", str(out), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((out / "result.json").read_text())
    steps = [m["step_time_s"] for m in metrics[1:] if "step_time_s" in m]
    return {"result": result, "step_time_s": statistics.median(steps) if steps else None,
            "peak_rss_gb": max(m.get("mem_peak_rss_gb", 0) for m in metrics), "losses": [m["loss"] for m in metrics]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--compare-steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "sft")
    args = parser.parse_args()
    import torch

    lora = run_sft(args.out / "lora", f"train.steps={args.steps}")
    r = lora["result"]
    keys = ("accuracy_before", "accuracy_after", "heldout_loss_before", "heldout_loss_after", "ended_turn_before",
            "ended_turn_after", "heldout", "dialogues_trained", "trainable_params", "params", "seconds")
    report = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "lora_run": {k: r[k] for k in keys},
              "lora_losses": lora["losses"]}
    small = [f"train.steps={args.compare_steps}", "heldout.limit=1", "checkpoint.every=0", "checkpoint.at_end=false",
             "checkpoint.export=false"]
    for name, extra in (("lora", []), ("full", ["lora=false", "optim.lr=2e-5"])):
        m = run_sft(args.out / f"compare-{name}", *small, *extra)
        report[f"{name}_step_time_s"] = m["step_time_s"]
        report[f"{name}_peak_rss_gb"] = m["peak_rss_gb"]
        report[f"{name}_trainable_params"] = m["result"]["trainable_params"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
