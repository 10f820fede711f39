"""What machine a benchmark ran on, printed with its figures."""

from __future__ import annotations

import platform
import subprocess


def cpu() -> str:
    """The CPU model and its AVX / AMX flags (what decides the fast dtype here), from lscpu."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    except OSError:
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("Flags")), [])
    return f"{model}; " + " ".join(f for f in flags if f.startswith(("avx", "amx")))
