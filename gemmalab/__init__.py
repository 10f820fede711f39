"""gemmalab: the Gemma recipe on PyTorch.

    model, tokenizer = gemmalab.load("gemma3-270m")
    outs = gemmalab.generate(model, tokenizer, ["The capital of France is"], max_new_tokens=16)
"""

from gemmalab.checkpoint import load, load_tokenizer, save_hf
from gemmalab.errors import GemmalabError
from gemmalab.inference import Completion, Engine, SamplingParams, generate
from gemmalab.model import PRESETS, Gemma, KVCache, ModelConfig, get_preset
from gemmalab.tokenizer import Tokenizer

__all__ = [
    "Completion", "Engine", "Gemma", "GemmalabError", "KVCache", "ModelConfig", "PRESETS",
    "SamplingParams", "Tokenizer",
    "generate", "get_preset", "load", "load_tokenizer", "save_hf",
]
