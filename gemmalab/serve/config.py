"""The server's limits, one dataclass (no web framework needed to read or check them)."""

from __future__ import annotations

from dataclasses import dataclass

from gemmalab.errors import GemmalabError


@dataclass
class ServeConfig:
    """The server's limits. Every one bounds what a single request (or a burst of them) can cost."""

    max_batch_size: int = 32  # rows decoded together
    max_queue: int = 64  # prompts that may wait; more answer 429 with Retry-After
    kv_cache_gib: float = 4.0  # keys and values of the running rows (plus one joining row's); the rest wait
    max_body_bytes: int = 4 * 2**20  # larger request bodies answer 413
    max_prompt_tokens: int | None = None  # None: the model's context
    max_tokens: int = 4096  # the most new tokens one choice may ask for; also the cap of chat's default
    max_prompts: int = 32  # prompts x n in one request
    max_n: int = 8
    max_stop: int = 8  # stop strings per request
    max_stop_chars: int = 256  # characters per stop string
    request_timeout_s: float = 600.0  # from queueing to the last token; then 504 (or an error event in a stream)
    prefill_chunk: int = 256  # prompt tokens prefilled per turn, between decode steps

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_body_bytes", "max_tokens", "max_prompts", "max_n",
                     "max_stop_chars", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise GemmalabError(f"serve: {name} must be >= 1, got {getattr(self, name)}.")
        if self.max_stop < 0:
            raise GemmalabError(f"serve: max_stop must be >= 0, got {self.max_stop}.")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise GemmalabError(f"serve: max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}.")
        if not (0 < self.kv_cache_gib < float("inf") and self.request_timeout_s > 0):
            raise GemmalabError(f"serve: kv_cache_gib and request_timeout_s must be > 0, got {self.kv_cache_gib} "
                                f"and {self.request_timeout_s}.")
