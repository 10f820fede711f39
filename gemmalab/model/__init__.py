"""The Gemma model family."""

from gemmalab.model.cache import KVCache
from gemmalab.model.config import PRESETS, ModelConfig, get_preset
from gemmalab.model.gemma import Gemma

__all__ = ["Gemma", "KVCache", "ModelConfig", "PRESETS", "get_preset"]
