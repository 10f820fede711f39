"""`gemmalab serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batched Engine.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both also streaming, by
server-sent events) and `GET /health`.

One worker thread owns the engine, since the model is not thread-safe. Each prompt of each request becomes a job in
a bounded queue; the worker takes the first waiting job, waits up to `batch_wait_ms` for more, and runs up to
`max_batch_size` jobs together in one `Engine.generate` call. Text deltas travel back to the request's asyncio queue
through `loop.call_soon_threadsafe`, so streams show tokens as they are produced. A full queue answers 429 at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

from gemmalab.errors import GemmalabError
from gemmalab.inference.engine import Completion, Engine, SamplingParams
from gemmalab.tokenizer import TokenizerError

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, field_validator
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # the server's dependencies are an optional extra
    raise GemmalabError(
        f"`gemmalab serve` needs FastAPI and uvicorn ({e.name} is missing); install them with "
        "`pip install 'gemmalab[serve]'`."
    ) from None

__all__ = ["ServerStats", "create_app", "serve"]

log = logging.getLogger("gemmalab.serve")


# ---- errors -----------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 turned into OpenAI's 400, naming the first offending field."""
    err = exc.errors()[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return _bad(f"The request body is not valid JSON ({detail}).".replace(" ()", ""))
    if not loc:  # the body is missing, or JSON but not an object
        return _bad("The request body must be a JSON object.")
    path = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "missing":
        return _bad(f"Missing required parameter: '{path}'.", param=str(loc[0]))
    got = f" (got {json.dumps(err['input'], default=str)[:100]})" if "input" in err else ""
    return _bad(f"Invalid '{path}': {msg}{got}.", param=str(loc[0]))


# ---- request bodies ---------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    """The fields both endpoints share. Unknown fields are ignored (as OpenAI-compatible servers do); fields that
    would change the result but are not implemented are refused in `_refuse_unsupported`."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # extension; 0 and -1 mean "no top-k", as in vLLM
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    stop: Any = Field(None, validate_default=True)  # becomes a tuple of strings
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> tuple[str, ...]:
        if v is None:
            return ()
        if isinstance(v, str):
            return (v,)
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            return tuple(v)
        raise ValueError("stop must be a string or a list of strings")


class CompletionRequest(_SamplingFields):
    """Body of POST /v1/completions."""

    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> list:
        def ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(v, str):
            return [v]
        if ids(v):
            return [v]
        if isinstance(v, list) and v and all(isinstance(p, str) or ids(p) for p in v):
            return v
        raise ValueError("prompt must be a string, a non-empty list of strings, a list of token ids, "
                         "or a list of lists of token ids")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: ignored

    role: str
    content: Any

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> str:
        if isinstance(v, str):
            return v
        # The list form: only text parts can be read by a text model.
        def text_part(p: Any) -> bool:
            return isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)

        if isinstance(v, list) and all(text_part(p) for p in v):
            return "".join(p["text"] for p in v)
        raise ValueError("content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts")


class ChatCompletionRequest(_SamplingFields):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# Fields that would change the answer, with the values that mean "not used".
_UNSUPPORTED = {
    "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1), "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "top_logprobs": (None, 0),
}


def _refuse_unsupported(req: _SamplingFields) -> None:
    if req.n not in (None, 1):
        raise _bad(f"n must be 1 on this server (got {req.n}); send separate requests instead.", param="n")
    values = {**(req.model_extra or {}), **{k: getattr(req, k) for k in _UNSUPPORTED if k in type(req).model_fields}}
    for name, neutral in _UNSUPPORTED.items():
        if name in values and values[name] not in neutral:
            raise _bad(f"'{name}' is not supported by this server.", param=name)
    fmt = (req.model_extra or {}).get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise _bad("'response_format' is not supported by this server (only plain text).", param="response_format")


# ---- the worker ---------------------------------------------------------------------------------------------------


@dataclass
class ServerStats:
    """Counters the worker keeps (read them from `app.state.stats`)."""

    accepted: int = 0  # jobs (prompts) taken into the queue
    rejected: int = 0  # jobs refused because the queue was full
    waiting: int = 0  # jobs in the queue now
    batches: int = 0  # engine.generate calls
    max_batch_size: int = 0  # the most jobs run together so far


@dataclass(eq=False)
class _Job:
    """One prompt of one request, as the worker sees it; events go back to the request's asyncio queue."""

    index: int  # the choice index within its request
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: bool = False  # the client went away: keep generating if running, but drop the output

    def send(self, *event: Any) -> None:
        if self.cancelled:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (self.index, *event))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass


class _Batcher:
    """A bounded job queue and the one thread that runs jobs on the engine in batches."""

    def __init__(self, engine: Engine, max_queue: int, max_batch_size: int, batch_wait_s: float):
        self.engine, self.max_queue, self.max_batch_size, self.batch_wait_s = (
            engine, max_queue, max_batch_size, batch_wait_s)
        self.stats = ServerStats()
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closed = True
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            self._closed = False
        self._thread = threading.Thread(target=self._work, name="gemmalab-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Refuse new jobs, fail the waiting ones, and let the thread end after its current batch."""
        with self._cond:
            self._closed = True
            dropped = list(self._jobs)
            self._jobs.clear()
            self.stats.waiting = 0
            self._cond.notify_all()
        for job in dropped:
            job.send("error", APIError(503, "The server is shutting down.", type="server_error"))
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, jobs: list[_Job]) -> None:
        """Queue all of a request's jobs, or none: APIError 429 when they do not fit, 503 when stopped."""
        with self._cond:
            if self._closed or self._thread is None or not self._thread.is_alive():
                raise APIError(503, "The server is not running (starting up or shutting down).", type="server_error")
            if len(self._jobs) + len(jobs) > self.max_queue:
                self.stats.rejected += len(jobs)
                raise APIError(429, f"The server is busy: {len(self._jobs)} prompts are waiting (at most "
                               f"{self.max_queue}). Retry later.", type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": "1"})
            self._jobs.extend(jobs)
            self.stats.accepted += len(jobs)
            self.stats.waiting = len(self._jobs)
            self._cond.notify_all()

    def _take(self) -> list[_Job] | None:
        """The next batch (None once stopped): the first waiting job and those that arrive within batch_wait_s."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._jobs) < self.max_batch_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = [self._jobs.popleft() for _ in range(min(len(self._jobs), self.max_batch_size))]
            self.stats.waiting = len(self._jobs)
        return [j for j in batch if not j.cancelled]  # clients that left while waiting need no tokens

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            if batch:
                self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        self.stats.batches += 1
        self.stats.max_batch_size = max(self.stats.max_batch_size, len(batch))
        try:
            results = self.engine.generate([j.prompt_ids for j in batch], [j.params for j in batch],
                                           lambda i, delta, finish: batch[i].send("token", delta, finish))
        except Exception as e:  # requests were checked before they were queued; still, never let the worker die
            log.exception("engine.generate failed for a batch of %d", len(batch))
            for job in batch:
                job.send("error", APIError(500, f"Generation failed: {e}", type="server_error"))
            return
        for job, completion in zip(batch, results):
            job.send("done", completion)


# ---- following a request's jobs -----------------------------------------------------------------------------------


@dataclass
class _Choice:
    text: str = ""
    tokens: int = 0  # tokens generated, a final stop token included
    finish_reason: str | None = None
    completion: Completion | None = None  # the engine's result, once the whole batch is done
    reported: bool = False


async def _follow(n: int, events: asyncio.Queue,
                  need_completion: bool) -> AsyncIterator[tuple[int, str, _Choice | None]]:
    """Yield (choice index, text delta, the finished choice or None) until all `n` choices are finished.

    A choice finishes at its last token, so a short answer need not wait for the rest of its batch; only when the
    engine's Completion is needed (logprobs) does it wait for the batch to end.
    """
    choices = [_Choice() for _ in range(n)]
    left = n
    while left:
        index, kind, *rest = await events.get()
        c = choices[index]
        if c.reported:
            continue
        delta = ""
        if kind == "token":
            delta, finish = rest
            c.text += delta
            c.tokens += 1
            c.finish_reason = c.finish_reason or finish
        elif kind == "done":
            c.completion = rest[0]
            c.finish_reason = c.finish_reason or c.completion.finish_reason  # max_tokens=0 sends no token
        else:
            raise rest[0]
        done = c.finish_reason is not None and (c.completion is not None or not need_completion)
        if done:
            c.reported, left = True, left - 1
        if delta or done:
            yield index, delta, c if done else None


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _token_texts(tokenizer, ids: list[int]) -> list[tuple[str, list[int]]]:
    """Each token's text and its UTF-8 bytes (a byte-fallback piece is one byte of a longer character)."""
    out = []
    for t in ids:
        m = _BYTE_PIECE.fullmatch(tokenizer.piece(t))
        text = tokenizer.decode([t])
        out.append((text, [int(m.group(1), 16)] if m else list(text.encode("utf-8"))))
    return out


# ---- the app ------------------------------------------------------------------------------------------------------


def create_app(engine: Engine, model_name: str, *, max_queue: int = 64, max_batch_size: int | None = None,
               batch_wait_ms: float = 5.0) -> FastAPI:
    """The OpenAI-compatible app serving `engine` under the name `model_name`.

    At most `max_queue` prompts wait (more answer 429); the worker runs up to `max_batch_size` (default: the
    engine's) together, waiting up to `batch_wait_ms` after the first for others to join. The worker thread starts
    and stops with the app's lifespan; `app.state.stats` holds its counters.
    """
    if max_queue < 1:
        raise GemmalabError(f"max_queue must be >= 1, got {max_queue}.")
    batch_size = max_batch_size or engine.max_batch_size
    if batch_size < 1:
        raise GemmalabError(f"max_batch_size must be >= 1, got {batch_size}.")
    batcher = _Batcher(engine, max_queue, batch_size, batch_wait_ms / 1000)
    tokenizer = engine.tokenizer
    context = engine.model.config.max_seq_len
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="gemmalab", summary=f"OpenAI-compatible API for {model_name}", lifespan=lifespan)
    app.state.stats = batcher.stats
    app.state.batcher = batcher

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return APIError(500, f"Internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{model_name}`.",
                           param="model", code="model_not_found")

    def sampling(req: _SamplingFields, prompt_len: int, max_tokens: int, logprobs: bool, param: str) -> SamplingParams:
        if prompt_len + max_tokens > context:
            raise _bad(f"This model's maximum context length is {context} tokens, but you requested "
                       f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                       "completion). Shorten the prompt or lower max_tokens.", param=param,
                       code="context_length_exceeded")
        top_k = req.top_k if req.top_k and req.top_k > 0 else None
        temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=req.top_p,
                              seed=req.seed, stop=req.stop, logprobs=logprobs)

    async def start(prompts: list[list[int]], params: list[SamplingParams]) -> tuple[list[_Job], asyncio.Queue]:
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        jobs = [_Job(i, p, sp, loop, events) for i, (p, sp) in enumerate(zip(prompts, params))]
        batcher.submit(jobs)
        return jobs, events

    def cancel(jobs: list[_Job]) -> None:
        for job in jobs:
            job.cancelled = True

    def streaming(body: AsyncIterator[str], jobs: list[_Job]) -> StreamingResponse:
        async def guarded() -> AsyncIterator[str]:
            try:
                async for chunk in body:
                    yield chunk
            except APIError as e:  # the status line is sent already: report the error in the stream
                yield _sse(e.body())
            finally:  # also when the client disconnects: its rows may keep running, their output is dropped
                cancel(jobs)

        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **asdict(batcher.stats)}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "gemmalab"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        _refuse_unsupported(req)
        prompts: list[list[int]] = []
        for p in req.prompt:
            try:
                ids = tokenizer.encode(p) if isinstance(p, str) else p
            except TokenizerError as e:
                raise _bad(str(e), param="prompt") from None
            if any(not 0 <= t < tokenizer.vocab_size for t in ids):
                raise _bad(f"Token ids in the prompt must be in [0, {tokenizer.vocab_size}).", param="prompt")
            prompts.append(ids)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        want_logprobs = req.logprobs is not None
        params = [sampling(req, len(p), max_tokens, want_logprobs, "max_tokens") for p in prompts]
        jobs, events = await start(prompts, params)
        rid, created = _new_id("cmpl"), int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)

        def logprobs_of(index: int, c: _Choice) -> dict | None:
            if not want_logprobs:
                return None
            offset = len(req.prompt[index]) if isinstance(req.prompt[index], str) else 0
            tokens, offsets = [], []
            for text, _ in _token_texts(tokenizer, c.completion.ids):
                tokens.append(text)
                offsets.append(offset)
                offset += len(text)
            return {"tokens": tokens, "token_logprobs": c.completion.logprobs, "top_logprobs": None,
                    "text_offset": offsets}

        def chunk(index: int, text: str, finish: str | None, logprobs: dict | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

        if not req.stream:
            finished: list[_Choice] = [None] * len(jobs)  # type: ignore[list-item]
            try:
                async for index, _, c in _follow(len(jobs), events, want_logprobs):
                    if c is not None:
                        finished[index] = c
            finally:
                cancel(jobs)
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": i, "text": c.text, "logprobs": logprobs_of(i, c),
                                 "finish_reason": c.finish_reason} for i, c in enumerate(finished)],
                    "usage": _usage(prompt_tokens, sum(c.tokens for c in finished))}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def body() -> AsyncIterator[str]:
            generated = 0
            async for index, delta, c in _follow(len(jobs), events, want_logprobs):
                if delta:
                    yield _sse(chunk(index, delta, None, None))
                if c is not None:
                    generated += c.tokens
                    # logprobs of all the choice's tokens come with its last chunk, as the engine gives them
                    yield _sse(chunk(index, "", c.finish_reason, logprobs_of(index, c)))
            if include_usage:
                yield _sse({**chunk(0, "", None, None), "choices": [], "usage": _usage(prompt_tokens, generated)})
            yield _sse("[DONE]")

        return streaming(body(), jobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        check_model(req.model)
        _refuse_unsupported(req)
        try:
            ids = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in req.messages])
        except TokenizerError as e:
            raise _bad(str(e), param="messages") from None
        if len(ids) >= context:
            raise _bad(f"This model's maximum context length is {context} tokens, but the messages take "
                       f"{len(ids)} tokens, leaving no room for an answer.", param="messages",
                       code="context_length_exceeded")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = context - len(ids) if max_tokens is None else max_tokens  # default: the rest of the context
        want_logprobs = bool(req.logprobs)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        jobs, events = await start([ids], [sampling(req, len(ids), max_tokens, want_logprobs, param)])
        rid, created = _new_id("chatcmpl"), int(time.time())

        def logprobs_of(c: _Choice) -> dict | None:
            if not want_logprobs:
                return None
            return {"content": [{"token": text, "logprob": lp, "bytes": raw, "top_logprobs": []}
                                for (text, raw), lp in zip(_token_texts(tokenizer, c.completion.ids),
                                                           c.completion.logprobs)],
                    "refusal": None}

        if not req.stream:
            c: _Choice | None = None
            try:
                async for _, _, done in _follow(1, events, want_logprobs):
                    c = done or c
            finally:
                cancel(jobs)
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text, "refusal": None},
                                 "logprobs": logprobs_of(c), "finish_reason": c.finish_reason}],
                    "usage": _usage(len(ids), c.tokens)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}], **extra}

        async def body() -> AsyncIterator[str]:
            yield _sse(chunk({"role": "assistant", "content": ""}))
            async for _, delta, c in _follow(1, events, want_logprobs):
                if delta:
                    yield _sse(chunk({"content": delta}))
                if c is not None:
                    yield _sse(chunk({}, c.finish_reason, logprobs_of(c)))
                    if include_usage:
                        yield _sse({**chunk({}), "choices": [], "usage": _usage(len(ids), c.tokens)})
            yield _sse("[DONE]")

        return streaming(body(), jobs)

    return app


def serve(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          **kw: Any) -> None:
    """Serve `engine` as `model_name` on http://host:port until interrupted (Ctrl-C).

    Binds to 127.0.0.1 unless told otherwise: there is no authentication. `kw` goes to `create_app`
    (max_queue, max_batch_size, batch_wait_ms).
    """
    import uvicorn

    uvicorn.run(create_app(engine, model_name, **kw), host=host, port=port, log_level=log_level)
