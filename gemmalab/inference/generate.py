"""`gemmalab.generate`: the one-call API over the Engine."""

from __future__ import annotations

from gemmalab.inference.engine import Completion, Engine, SamplingParams
from gemmalab.model import Gemma

def generate(model: Gemma, tokenizer, prompts: str | list[str] | list[list[int]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_ids: tuple[int, ...] | None = None, stop: tuple[str, ...] = (), logprobs: bool = False,
             max_batch_size: int = 32) -> list[Completion]:
    """Continue each prompt; returns one Completion (`.ids`, `.text`, `.finish_reason`) per prompt.

    Prompts are strings (encoded with BOS) or lists of token ids. Each stops at a stop token (default:
    `<eos>` and `<end_of_turn>`), a stop string, or after max_new_tokens. Temperature 0 is greedy.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, tuple(stop),
                            None if stop_ids is None else tuple(stop_ids), logprobs)
    return Engine(model, tokenizer, max_batch_size=max_batch_size).generate(list(prompts), params)
