"""Text generation."""

from gemmalab.inference.generate import Generation, generate, sample_next

__all__ = ["Generation", "generate", "sample_next"]
