"""Inference: the batched engine, sampling, scoring, and the one-call `generate`."""

from gemmalab.inference.engine import Completion, Engine, SamplingParams, Score
from gemmalab.inference.generate import Generation, generate

__all__ = ["Completion", "Engine", "Generation", "SamplingParams", "Score", "generate"]
