"""Inference: the batched engine, sampling, scoring, and the one-call `generate`."""

from gemmalab.inference.engine import Completion, Engine, SamplingParams, Score
from gemmalab.inference.generate import generate

__all__ = ["Completion", "Engine", "SamplingParams", "Score", "generate"]
