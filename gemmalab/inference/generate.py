"""Batched generation with a KV cache: greedy and sampled decoding (temperature, top-k, top-p, seed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemmalab.errors import GemmalabError
from gemmalab.model import Gemma, KVCache


@dataclass
class Generation:
    """One prompt's result: the prompt ids, the new ids (without the stop token), their text, and why it stopped."""

    prompt_ids: list[int]
    ids: list[int]
    text: str
    finish_reason: str  # "stop" (a stop token) or "length" (max_new_tokens)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]. Temperature 0 is greedy.

    top-k keeps the k most likely tokens; top-p keeps the smallest set of most likely tokens whose mass reaches p
    (the token that crosses p stays, as in gemma_pytorch).
    """
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_k is not None or top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = torch.zeros_like(sorted_probs, dtype=torch.bool)
        if top_p is not None:
            drop |= (sorted_probs.cumsum(-1) - sorted_probs) > top_p
        if top_k is not None:
            drop[:, top_k:] = True
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(max_new_tokens, temperature, top_k, top_p):
    if max_new_tokens < 0:
        raise GemmalabError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    if temperature < 0:
        raise GemmalabError(f"temperature must be >= 0, got {temperature}.")
    if top_k is not None and top_k < 1:
        raise GemmalabError(f"top_k must be >= 1, got {top_k}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise GemmalabError(f"top_p must be in (0, 1], got {top_p}.")


@torch.no_grad()
def generate(model: Gemma, tokenizer, prompts: str | list[str] | list[list[int]], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_ids: tuple[int, ...] | None = None) -> list[Generation]:
    """Continue each prompt; returns one Generation per prompt.

    Prompts are strings (encoded with BOS) or lists of token ids. They run as one left-padded batch; each row
    stops at its first stop token (default: `<eos>` and `<end_of_turn>`) or after max_new_tokens.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    if isinstance(prompts, str):
        prompts = [prompts]
    prompt_ids = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise GemmalabError("Every prompt needs at least one token.")
    stop_ids = tuple(tokenizer.stop_ids if stop_ids is None else stop_ids)
    device = model.embed.weight.device
    B, longest = len(prompt_ids), max(map(len, prompt_ids))
    limit = model.config.max_seq_len
    if longest + max_new_tokens > limit:
        raise GemmalabError(f"The longest prompt ({longest} tokens) plus max_new_tokens ({max_new_tokens}) exceeds "
                            f"this model's {limit} positions.")

    tokens = torch.zeros(B, longest, dtype=torch.long)
    mask = torch.zeros(B, longest, dtype=torch.bool)
    for i, p in enumerate(prompt_ids):  # left padding: every row's last prompt token sits in the last column
        tokens[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = True
    cache = KVCache(model.config, B, longest + max_new_tokens, model.embed.weight.dtype, device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    new = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool)
    stop = torch.tensor(stop_ids, dtype=torch.long)
    if max_new_tokens:
        logits = model(tokens.to(device), attention_mask=mask.to(device), cache=cache, last_only=True)[:, -1]
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator).cpu()
        for i in range(B):
            if not done[i]:
                new[i].append(int(nxt[i]))
        done |= torch.isin(nxt, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(nxt[:, None].to(device), cache=cache, last_only=True)[:, -1]

    results = []
    for p, ids in zip(prompt_ids, new):
        stopped = bool(ids) and ids[-1] in stop_ids
        ids = ids[:-1] if stopped else ids
        results.append(Generation(p, ids, tokenizer.decode(ids) if tokenizer else "", "stop" if stopped else "length"))
    return results
