"""The two kinds of evaluation request, over the inference engine: log-likelihood of a continuation and
text generated until a stop string. Our harness and the lm-evaluation-harness adapter both go through here,
so the same (context, continuation) gives the same number in both."""

from __future__ import annotations

from gemmalab.inference import Engine, SamplingParams


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context (with Gemma's BOS) and of its continuation, split exactly as lm-eval's causal models
    split them (`TemplateLM._encode_pair`): trailing whitespace of the context (spaces, newlines, tabs) moves to
    the continuation, the two are encoded as one string, and the continuation is that encoding's ids after the
    first len(context's own encoding). Where a token spans the boundary (a split inside a word) those ids need
    not spell the continuation; lm-eval scores them anyway, and so do we, so the numbers agree. An empty context
    is just BOS: Gemma needs it (lm-eval PR #1465)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context, bos=True)
    continuation_ids = tokenizer.encode(context + continuation, bos=True)[len(context_ids):]
    if continuation and not continuation_ids:  # the whole is no longer than the context: lm-eval fails an assert
        continuation_ids = tokenizer.encode(continuation, bos=False)
    return context_ids, continuation_ids


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
