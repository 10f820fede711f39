"""Judges for side-by-side evaluation, behind one method: `judge(pairings) -> verdicts`, each verdict "A" (the
answer shown first), "B" or "tie".

- `LocalJudge`: any model through the inference engine. The pairwise prompt ends with the judge's turn opened on
  "[[", and the verdict is the likeliest of the labels A / B / C (tie) as the next token: read from
  log-probabilities, it never fails to parse, and the probabilities are kept.
- `HTTPJudge`: any OpenAI-compatible chat API (`gemmalab serve`, vLLM, llama.cpp's server, hosted APIs); the
  verdict is the last [[A]] / [[B]] / [[C]] of its reply (an explanation that quotes a label earlier does not
  count). Retries with backoff on 429 and 5xx (honouring Retry-After), a request-rate limit, a clear error when
  the server cannot be reached.
- `ReferenceJudge`: for prompts that carry a known answer: the answer that contains it wins.

Where a prompt has a reference answer, the LM judges see it too (FastChat's reference-guided grading).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import threading
import time
import unicodedata
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from gemmalab.errors import GemmalabError

__all__ = ["Pairing", "Verdict", "Judge", "LocalJudge", "HTTPJudge", "HTTPJudgeSettings", "ReferenceJudge",
           "judge_prompt", "parse_verdict", "contains_reference"]

LABELS = {"A": "A", "B": "B", "C": "tie"}  # what the judge writes -> the verdict

JUDGE_TEMPLATE = """\
Please act as an impartial judge and compare two answers to the user prompt below. Choose the answer that follows \
the prompt's instructions better and is more helpful, correct, harmless and clear. Do not let the order of the \
answers or their length influence you.{reference_note}

[User prompt]
{prompt}
{reference}
[Answer A]
{a}

[Answer B]
{b}

After at most a few sentences of reasoning, give your verdict in exactly this form: [[A]] if answer A is better, \
[[B]] if answer B is better, [[C]] for a tie."""


@dataclass(frozen=True)
class Pairing:
    """One question to a judge: the prompt and two answers in the seats they are shown in."""

    prompt: str
    a: str
    b: str
    reference: str | None = None


@dataclass
class Verdict:
    """"A", "B" or "tie"; `probs` (local judge: the labels' probabilities), `text` (HTTP judge: its reply) and
    `parsed` (False when the reply held no verdict: counted as a tie and reported)."""

    choice: str
    probs: dict[str, float] | None = None
    text: str | None = None
    parsed: bool = True
    truncated: bool = False  # answers were shortened to fit the judge's context

    def record(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


class Judge(Protocol):
    """What the side-by-side stage needs of a judge."""

    def describe(self) -> dict:
        """Settings that identify this judge (a resumed run must be judged by the same one)."""

    def judge(self, pairings: list[Pairing]) -> list[Verdict]:
        """One verdict per pairing, in order."""


def judge_prompt(p: Pairing) -> str:
    """The pairwise prompt every LM judge gets (FastChat's pair-v2 in substance, with the reference if known)."""
    reference = f"\n[Reference answer]\n{p.reference}\n" if p.reference else ""
    note = " A reference answer is given: an answer that contradicts it is wrong." if p.reference else ""
    return JUDGE_TEMPLATE.format(prompt=p.prompt, a=p.a, b=p.b, reference=reference, reference_note=note)


_VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_BARE = re.compile(r"^\W*(A|B|C|tie)\W*$", re.IGNORECASE)


def parse_verdict(text: str) -> tuple[str, bool]:
    """(verdict, parsed) of a judge's reply: its last [[A]] / [[B]] / [[C]] (or [[tie]]); else a reply that is
    just a label ("B", "tie."); else ("tie", False)."""
    found = _VERDICT.findall(text) or _BARE.findall(text.strip())
    if not found:
        return "tie", False
    label = found[-1].upper()
    return LABELS.get(label, "tie"), True


# ---- local -----------------------------------------------------------------------------------------------------


class LocalJudge:
    """A model REF's engine as the judge; the verdict is the likeliest label after "[[" in its own turn."""

    def __init__(self, engine, name: str) -> None:
        self.engine, self.name = engine, name
        tok = engine.tokenizer
        self.label_ids = []
        for label in LABELS:
            ids = tok.encode(label, bos=False, parse_special=False)
            self.label_ids.append(ids[0])
        if len(set(self.label_ids)) != len(LABELS):
            raise GemmalabError(f"Judge {name}: its tokenizer does not tell the labels A, B, C apart as first tokens.")

    def describe(self) -> dict:
        return {"kind": "local", "model": self.name}

    def _ids(self, p: Pairing) -> tuple[list[int], bool]:
        """The judge's prompt ids ending in "[[", with both answers cut (the same share each) to fit its context."""
        tok, limit = self.engine.tokenizer, self.engine.model.config.max_seq_len

        def ids_of(pairing: Pairing) -> list[int]:
            return tok.apply_chat_template([{"role": "user", "content": judge_prompt(pairing)}]) + tok.encode(
                "[[", bos=False, parse_special=False)

        ids = ids_of(p)
        if len(ids) <= limit:
            return ids, False
        a, b = (tok.encode(x, bos=False, parse_special=False) for x in (p.a, p.b))
        room = (limit - (len(ids) - len(a) - len(b))) // 2 - 2  # a little for the "…" and tokenization seams
        if room < 1:
            raise GemmalabError(f"Judge {self.name}: the prompt alone ({len(ids) - len(a) - len(b)} tokens) does not "
                                f"fit its {limit} positions; use a judge with a longer context.")
        cut = Pairing(p.prompt, tok.decode(a[:room]) + "…", tok.decode(b[:room]) + "…", p.reference)
        return ids_of(cut)[:limit], True

    def judge(self, pairings: list[Pairing]) -> list[Verdict]:
        prompts = [self._ids(p) for p in pairings]
        rows = self.engine.next_token_logprobs([ids for ids, _ in prompts], self.label_ids)
        verdicts = []
        for logprobs, (_, truncated) in zip(rows, prompts):
            top = max(logprobs)
            weights = [math.exp(lp - top) for lp in logprobs]
            probs = {LABELS[label]: w / sum(weights) for label, w in zip(LABELS, weights)}
            choice = max(probs, key=probs.get)
            verdicts.append(Verdict(choice, probs={k: round(v, 6) for k, v in probs.items()}, truncated=truncated))
        return verdicts


# ---- reference -------------------------------------------------------------------------------------------------


def _normal(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s.]|(?<!\d)\.|\.(?!\d)", " ", text).split())  # keep decimal points


def contains_reference(answer: str, reference: str) -> bool:
    """Whether the answer states the reference: its words, in order, as whole words (case, punctuation and spacing
    aside; "1969." and "In 1969, ..." both contain "1969", "19690" does not)."""
    ref = _normal(reference)
    return bool(ref) and re.search(rf"(?<!\w){re.escape(ref)}(?!\w)", _normal(answer)) is not None


@dataclass(frozen=True)
class ReferenceJudge:
    """For prompts with a known answer: the answer that contains the reference wins; both or neither is a tie.
    With `exact`, an answer must be the reference itself (case, punctuation and spacing aside): a checkable task's
    judge, which an answer padded with repetitions of the right one does not fool."""

    exact: bool = False

    def describe(self) -> dict:
        return {"kind": "reference", **({"match": "exact"} if self.exact else {})}

    def right(self, answer: str, reference: str) -> bool:
        return _normal(answer) == _normal(reference) if self.exact else contains_reference(answer, reference)

    def judge(self, pairings: list[Pairing]) -> list[Verdict]:
        verdicts = []
        for p in pairings:
            if not p.reference:
                raise GemmalabError("The reference judge needs a reference answer for every prompt it judges.")
            a, b = self.right(p.a, p.reference), self.right(p.b, p.reference)
            verdicts.append(Verdict("A" if a and not b else "B" if b and not a else "tie"))
        return verdicts


# ---- HTTP ------------------------------------------------------------------------------------------------------


@dataclass
class HTTPJudgeSettings:
    """An OpenAI-compatible chat endpoint as the judge."""

    url: str  # the API base, e.g. http://127.0.0.1:8000/v1 (".../chat/completions" is added)
    model: str  # the model name the server knows
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this environment variable (if set); never stored
    max_tokens: int = 512  # room for a short reasoning before the verdict
    temperature: float = 0.0
    timeout_s: float = 120.0
    retries: int = 6  # per request, on 429 / 5xx / connection errors
    backoff_s: float = 1.0  # first wait; doubles per retry (with jitter), capped at max_backoff_s
    max_backoff_s: float = 60.0
    requests_per_s: float | None = None  # at most this many requests start per second (None: no limit)
    concurrency: int = 4  # requests in flight at once

    def __post_init__(self) -> None:
        if not re.match(r"^https?://", self.url):
            raise GemmalabError(f"`judge.url` must start with http:// or https://, got {self.url!r}.")
        for name in ("max_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise GemmalabError(f"`judge.{name}` must be >= 1, got {getattr(self, name)}.")
        if self.retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise GemmalabError("`judge.retries` and `judge.backoff_s` must be >= 0 and `judge.timeout_s` > 0.")
        if self.requests_per_s is not None and self.requests_per_s <= 0:
            raise GemmalabError(f"`judge.requests_per_s` must be > 0, got {self.requests_per_s}.")


class _RateLimit:
    """Spaces request starts at least 1 / rate seconds apart, across threads."""

    def __init__(self, per_s: float | None) -> None:
        self.gap = 1 / per_s if per_s else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.gap:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.gap
        time.sleep(max(0.0, start - now))


_RETRY_STATUS = {429, 500, 502, 503, 504}


@dataclass
class HTTPJudge:
    """Judges through an OpenAI-compatible `POST {url}/chat/completions`."""

    settings: HTTPJudgeSettings
    retried: int = 0  # retries made so far (429, 5xx, connection errors)
    _limit: _RateLimit = field(init=False, repr=False)
    _lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._limit = _RateLimit(self.settings.requests_per_s)

    def describe(self) -> dict:
        s = self.settings
        return {"kind": "http", "url": s.url, "model": s.model, "max_tokens": s.max_tokens,
                "temperature": s.temperature}

    def judge(self, pairings: list[Pairing]) -> list[Verdict]:
        with ThreadPoolExecutor(self.settings.concurrency) as pool:
            return list(pool.map(self._ask, pairings))

    def _ask(self, p: Pairing) -> Verdict:
        text = self.chat(judge_prompt(p))
        choice, parsed = parse_verdict(text)
        return Verdict(choice, text=text, parsed=parsed)

    def chat(self, content: str) -> str:
        """The reply to one user message (retried as the settings say); a GemmalabError when it cannot be had."""
        s = self.settings
        url = s.url.rstrip("/") + "/chat/completions"
        body = json.dumps({"model": s.model, "messages": [{"role": "user", "content": content}],
                           "max_tokens": s.max_tokens, "temperature": s.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(s.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(s.retries + 1):
            self._limit.wait()
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=s.timeout_s) as response:
                    return _reply_text(json.loads(response.read()), url)
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code not in _RETRY_STATUS:
                    raise GemmalabError(f"The judge at {url} answered {e.code}: {detail}") from None
                problem, retry_after = f"answered {e.code}: {detail}", _retry_after(e.headers.get("Retry-After"))
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                problem, retry_after = f"cannot be reached ({reason})", None
            except ValueError as e:  # not JSON
                raise GemmalabError(f"The judge at {url} sent a reply that is not JSON: {e}") from None
            if attempt == s.retries:
                raise GemmalabError(f"The judge at {url} {problem}, after {s.retries + 1} tries. Check the judge's URL "
                                    "and that its server is up.")
            with self._lock:
                self.retried += 1
            wait = min(s.max_backoff_s, s.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
            time.sleep(max(wait, retry_after or 0.0))
        raise AssertionError("unreachable")


def _reply_text(reply: object, url: str) -> str:
    try:
        content = reply["choices"][0]["message"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        raise GemmalabError(f"The judge at {url} sent no choices[0].message.content: {json.dumps(reply)[:300]}") from None
    return content if isinstance(content, str) else ""


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read() or b"{}")
        return str(body.get("error", {}).get("message") or body)[:300]
    except (ValueError, AttributeError, OSError):
        return str(e.reason)[:300]


def _retry_after(value: str | None) -> float | None:
    try:
        return min(float(value), 300.0) if value else None
    except ValueError:
        return None  # an HTTP date: fall back to the backoff
