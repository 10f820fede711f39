"""The two kinds of evaluation request, over the inference engine: log-likelihood of a continuation and
text generated until a stop string. Our harness and the lm-evaluation-harness adapter both go through here,
so the same (context, continuation) gives the same number in both."""

from __future__ import annotations

from gemmalab.inference import Engine, SamplingParams


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context (with Gemma's BOS) and of its continuation, split the way lm-eval splits them:
    trailing spaces of the context move to the continuation, the two are encoded as one string, and the
    continuation is what follows the context's own encoding. (Encoding the continuation alone could differ
    where a token spans the boundary.) An empty context is just BOS: Gemma needs it (lm-eval PR #1465)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context, bos=True)
    whole = tokenizer.encode(context + continuation, bos=True)
    if whole[:len(context_ids)] != context_ids:  # a token spans the boundary: keep the context's own encoding
        return context_ids, tokenizer.encode(continuation, bos=False)
    return context_ids, whole[len(context_ids):]


def loglikelihoods(engine: Engine, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding gives the continuation) for each pair."""
    encoded = [encode_pair(engine.tokenizer, c, x) for c, x in pairs]
    return [(s.logprob, s.is_greedy) for s in engine.score(encoded)]


def generate_until(engine: Engine, prompts: list[str], stop: tuple[str, ...] = (), max_new_tokens: int = 256,
                   temperature: float = 0.0, seed: int | None = None, seeds: list[int] | None = None) -> list[str]:
    """Text after each prompt (encoded with BOS), ending before the first stop string, <eos> or <end_of_turn>.
    Sampling (temperature > 0) uses `seeds[i]` for prompt i, or `seed + i`."""
    if seeds is None:
        seeds = [None if seed is None else seed + i for i in range(len(prompts))]
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop=tuple(stop), seed=s)
              for s in seeds]
    return [c.text for c in engine.generate(list(prompts), params)]
