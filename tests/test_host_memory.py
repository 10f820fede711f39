"""gemmalab.host_memory: freed memory stays in the process, so allocating it again costs no page faults. Counted
with getrusage's minor faults (no timing), in fresh processes: the setting is process-wide and cannot be undone."""

import json
import subprocess
import sys

import pytest

SCRIPT = """
import json, resource, sys
import torch
from gemmalab.host_memory import keep_freed_memory

applied = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(8):  # 64 MiB: above glibc's largest adaptive mmap threshold (32 MiB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(16 * 2**20); del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# the fewest: the heap grows over the first few allocations; after that a kept block is reused as it is
print(json.dumps({"applied": applied, "faults": min(faults)}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_kept_memory_is_reused_without_page_faults():
    default, kept = _faults("default"), _faults("keep")
    if not sys.platform.startswith("linux"):  # no glibc: nothing to set, and nothing is claimed
        assert kept["applied"] is False
        return
    assert kept["applied"] is True
    # glibc's default returns the 64 MiB block to the kernel, which faults it in again on the next allocation
    # (16,384 faults of 4 KiB pages here); kept, the same block is reused
    assert kept["faults"] < default["faults"] / 8, (default, kept)


def test_trainer_applies_it_on_cpu_unless_switched_off(tmp_path, monkeypatch):
    import gemmalab.train.loop as loop
    from gemmalab.config import load
    from gemmalab.train.pretrain import PretrainConfig

    calls = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = load(PretrainConfig, None, {"train.device": "cpu", "train.keep_freed_memory": False})
    assert cfg.train.keep_freed_memory is False
    loop.Trainer(cfg, tmp_path / "a", "pretrain")
    assert calls == []
    loop.Trainer(load(PretrainConfig, None, {"train.device": "cpu"}), tmp_path / "b", "pretrain")
    assert calls == [1]
