"""One dtype vocabulary for configs, the command line and the Python API: `fp32` / `float32`, `bf16` / `bfloat16`,
`fp16` / `float16` (either spelling, or a torch.dtype)."""

from __future__ import annotations

import torch

from gemmalab.errors import GemmalabError

__all__ = ["DTYPES", "parse_dtype", "dtype_name"]

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """The torch dtype a name (either spelling) or dtype stands for; anything else is a GemmalabError."""
    if isinstance(value, torch.dtype):
        if value not in _SHORT:
            raise GemmalabError(f"Unsupported dtype {value}; use one of {', '.join(DTYPES)}.")
        return value
    if not isinstance(value, str) or value.lower() not in DTYPES:
        raise GemmalabError(f"Unknown dtype {value!r}; use one of {', '.join(DTYPES)}.")
    return DTYPES[value.lower()]


def dtype_name(dtype: torch.dtype) -> str:
    """The short name configs are written with: fp32, bf16, fp16."""
    return _SHORT[parse_dtype(dtype)]
