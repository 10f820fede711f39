"""`gemmalab serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over continuous batching.

Endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both also streaming, by server-sent
events) and `GET /health`. Beside config.py (the limits, `ServeConfig`), schemas.py (request bodies, errors in
OpenAI's shape) and batcher.py (the one worker thread that owns the engine; no web framework), this is the app: a
route checks its request against the limits, tokenizes it off the event loop, submits one job per choice, and turns
the jobs' events into a JSON answer or a stream; text travels back from the worker through
`loop.call_soon_threadsafe` as it is made. A client that hangs up cancels its jobs, which leave the batch at the next
step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

from gemmalab.errors import GemmalabError
from gemmalab.serve.batcher import Batcher, Job, JobTimeout, NotRunning, Overloaded
from gemmalab.inference.engine import Completion, Engine, SamplingParams
from gemmalab.serve.config import ServeConfig
from gemmalab.serve.schemas import (APIError, ChatCompletionRequest, CompletionRequest, SamplingFields, bad_request,
                                    check_request, validation_error)
from gemmalab.tokenizer import TokenizerError

from fastapi import APIRouter, FastAPI, Request  # schemas (above) says how to install it when it is missing
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["ServeConfig", "create_app", "serve", "serving"]

log = logging.getLogger("gemmalab.serve")
RETRY_AFTER = {"Retry-After": "1"}


@dataclass
class _Served:
    """What the routes share: the engine's tokenizer, the batcher, the limits."""

    tokenizer: Any
    batcher: Batcher
    config: ServeConfig
    model_name: str
    context: int  # the model's positions
    started: int

    @property
    def max_prompt_tokens(self) -> int:
        return min(self.config.max_prompt_tokens or self.context, self.context)

    def check(self, req: SamplingFields) -> None:
        if req.model != self.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")
        check_request(req, self.config)

    def sampling(self, req: SamplingFields, prompt_len: int, max_tokens: int, logprobs: bool, param: str,
                 choice: int) -> SamplingParams:
        """The engine's parameters for choice `choice` of a prompt of `prompt_len` tokens, or a 400 naming the limit."""
        if max_tokens > self.config.max_tokens:
            raise bad_request(f"{param} must be at most {self.config.max_tokens} on this server (got {max_tokens}).",
                              param=param)
        if prompt_len + max_tokens > self.context:
            raise bad_request(f"This model's maximum context length is {self.context} tokens, but you requested "
                              f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                              "completion). Shorten the prompt or lower max_tokens.", param=param,
                              code="context_length_exceeded")
        if not self.batcher.fits_alone(prompt_len + max_tokens):
            raise bad_request(f"{prompt_len} prompt tokens plus {max_tokens} new ones need more KV cache than this "
                              f"server's budget ({self.config.kv_cache_gib:g} GiB); lower max_tokens.", param=param,
                              code="context_length_exceeded")
        top_k = req.top_k if req.top_k and req.top_k > 0 else None
        temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
        seed = req.seed if req.seed is None or not choice else (req.seed + choice) % 2**63  # n samples differ
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=req.top_p,
                              seed=seed, stop=req.stop, logprobs=logprobs)

    def check_prompt(self, ids: list[int], param: str) -> list[int]:
        if len(ids) > self.max_prompt_tokens:
            raise bad_request(f"The prompt has {len(ids)} tokens; this server takes at most {self.max_prompt_tokens}.",
                              param=param, code="context_length_exceeded")
        return ids

    def encode_prompts(self, prompts: list) -> list[list[int]]:
        """Token ids of each prompt of /v1/completions (runs on a thread: long texts take a while)."""
        out = []
        for p in prompts:
            try:
                ids = self.tokenizer.encode(p) if isinstance(p, str) else p
            except TokenizerError as e:
                raise bad_request(str(e), param="prompt") from None
            if any(not 0 <= t < self.tokenizer.vocab_size for t in ids):
                raise bad_request(f"Token ids in the prompt must be in [0, {self.tokenizer.vocab_size}).",
                                  param="prompt")
            out.append(self.check_prompt(ids, "prompt"))
        return out

    def encode_messages(self, req: ChatCompletionRequest) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in req.messages])
        except TokenizerError as e:
            raise bad_request(str(e), param="messages") from None
        if len(ids) >= self.context:
            raise bad_request(f"This model's maximum context length is {self.context} tokens, but the messages take "
                              f"{len(ids)} tokens, leaving no room for an answer.", param="messages",
                              code="context_length_exceeded")
        return self.check_prompt(ids, "messages")


def _served(request: Request) -> _Served:
    return request.app.state.served


# ---- following a request's jobs -----------------------------------------------------------------------------------


@dataclass
class _Choice:
    text: str = ""
    tokens: int = 0  # tokens generated, a final stop token included
    finish_reason: str | None = None
    completion: Completion | None = None  # the engine's result, after the last token
    reported: bool = False


def _as_api_error(exc: Exception) -> APIError:
    """What a client is told about a job that ended badly: the cause where it is theirs, an id to find in the
    server's log otherwise (internal exception text is not echoed)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, JobTimeout):
        return APIError(504, str(exc), type="timeout_error", code="timeout")
    if isinstance(exc, NotRunning):
        return APIError(503, str(exc), type="server_error", headers=RETRY_AFTER)
    return _internal(exc, "Generation failed for this request")


def _internal(exc: BaseException, what: str) -> APIError:
    ref = secrets.token_hex(6)
    log.error("%s [error %s]", what, ref, exc_info=exc)
    return APIError(500, f"{what} (error {ref}); the server's log has the details.", type="server_error")


class _Run:
    """One request's jobs in the batcher and the events that come back from them, in an asyncio queue."""

    def __init__(self, served: _Served, prompts: list[list[int]], params: list[SamplingParams]):
        self.batcher = served.batcher
        self.events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.jobs = [Job(p, sp, functools.partial(self._notify, loop, i), served.config.request_timeout_s)
                     for i, (p, sp) in enumerate(zip(prompts, params))]
        try:
            self.batcher.submit(self.jobs)
        except Overloaded as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full", headers=RETRY_AFTER) from None
        except NotRunning as e:
            raise APIError(503, str(e), type="server_error", headers=RETRY_AFTER) from None

    def _notify(self, loop: asyncio.AbstractEventLoop, index: int, *event: Any) -> None:
        try:
            loop.call_soon_threadsafe(self.events.put_nowait, (index, *event))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def cancel(self) -> None:
        self.batcher.cancel(self.jobs)

    async def follow(self, need_completion: bool) -> AsyncIterator[tuple[int, str, _Choice | None]]:
        """Yield (choice index, text delta, the finished choice or None) until every choice is finished."""
        choices = [_Choice() for _ in self.jobs]
        left = len(choices)
        while left:
            index, kind, *rest = await self.events.get()
            if kind == "gone":  # nobody to answer (nginx's 499)
                raise APIError(499, "The client closed the connection.")
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
                raise _as_api_error(rest[0])
            done = c.finish_reason is not None and (c.completion is not None or not need_completion)
            if done:
                c.reported, left = True, left - 1
            if delta or done:
                yield index, delta, c if done else None

    async def collect(self, request: Request, need_completion: bool) -> list[_Choice]:
        """Every choice, finished; a client that hangs up meanwhile cancels the jobs."""
        watcher = asyncio.create_task(_on_disconnect(request, self))
        finished: list[_Choice] = [None] * len(self.jobs)  # type: ignore[list-item]
        try:
            async for index, _, c in self.follow(need_completion):
                if c is not None:
                    finished[index] = c
        finally:
            watcher.cancel()
            self.cancel()
        return finished

    def stream(self, body: AsyncIterator[str]) -> StreamingResponse:
        async def guarded() -> AsyncIterator[str]:
            try:
                async for chunk in body:
                    yield chunk
            except APIError as e:  # the status line is sent already: report the error in the stream
                yield _sse(e.body())

        return _Stream(self, guarded())


class _Stream(StreamingResponse):
    """Server-sent events whose jobs are cancelled when the response ends, however it ends: finished, the client
    gone (Starlette stops the body), or a send that fails (servers that do not report disconnects)."""

    def __init__(self, run: _Run, body: AsyncIterator[str]):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.cancel()


async def _on_disconnect(request: Request, run: _Run) -> None:
    """Wait for the client to hang up (the body is read already, so the next message is the disconnect); then
    cancel its jobs and end the wait for their answers."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    run.cancel()
    run.events.put_nowait((0, "gone"))


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


# ---- routes -------------------------------------------------------------------------------------------------------

_router = APIRouter()


@_router.get("/health")
async def health(request: Request) -> JSONResponse:
    s = _served(request)
    up = s.batcher.alive
    return JSONResponse({"status": "ok" if up else "unavailable", **asdict(s.batcher.stats)},
                        status_code=200 if up else 503, headers=None if up else RETRY_AFTER)


def _model_card(s: _Served) -> dict:
    return {"id": s.model_name, "object": "model", "created": s.started, "owned_by": "gemmalab"}


@_router.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(_served(request))]}


@_router.get("/v1/models/{name:path}")
async def get_model(name: str, request: Request) -> dict:
    s = _served(request)
    if name != s.model_name:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{s.model_name}`.",
                       param="model", code="model_not_found")
    return _model_card(s)


@_router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    s = _served(request)
    s.check(req)
    n = req.choices
    if len(req.prompt) * n > s.config.max_prompts:
        raise bad_request(f"{len(req.prompt)} prompts x n={n} is over this server's limit of {s.config.max_prompts} "
                          "completions per request.", param="prompt")
    if len(req.prompt) * n > s.config.max_queue:
        raise bad_request(f"{len(req.prompt) * n} completions can never fit this server's queue of "
                          f"{s.config.max_queue}; send fewer per request.", param="prompt")
    prompts = await asyncio.to_thread(s.encode_prompts, req.prompt)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    want_logprobs = req.logprobs is not None
    params = [s.sampling(req, len(p), max_tokens, want_logprobs, "max_tokens", j) for p in prompts for j in range(n)]
    run = _Run(s, [p for p in prompts for _ in range(n)], params)
    rid, created, name = _new_id("cmpl"), int(time.time()), s.model_name
    prompt_tokens = sum(len(p) for p in prompts)

    def logprobs_of(index: int, c: _Choice) -> dict | None:
        if not want_logprobs:
            return None
        prompt = req.prompt[index // n]
        offset = len(prompt) if isinstance(prompt, str) else 0
        tokens, offsets = [], []
        for text, _ in _token_texts(s.tokenizer, c.completion.ids):
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": c.completion.logprobs, "top_logprobs": None,
                "text_offset": offsets}

    def chunk(index: int, text: str, finish: str | None, logprobs: dict | None) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

    if not req.stream:
        finished = await run.collect(request, want_logprobs)
        return {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"index": i, "text": c.text, "logprobs": logprobs_of(i, c),
                             "finish_reason": c.finish_reason} for i, c in enumerate(finished)],
                "usage": _usage(prompt_tokens, sum(c.tokens for c in finished))}

    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def body() -> AsyncIterator[str]:
        generated = 0
        async for index, delta, c in run.follow(want_logprobs):
            if delta:
                yield _sse(chunk(index, delta, None, None))
            if c is not None:
                generated += c.tokens
                # logprobs of all the choice's tokens come with its last chunk, as the engine gives them
                yield _sse(chunk(index, "", c.finish_reason, logprobs_of(index, c)))
        if include_usage:
            yield _sse({**chunk(0, "", None, None), "choices": [], "usage": _usage(prompt_tokens, generated)})
        yield _sse("[DONE]")

    return run.stream(body())


@_router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    s = _served(request)
    s.check(req)
    n = req.choices
    if n > s.config.max_queue:
        raise bad_request(f"n={n} completions can never fit this server's queue of {s.config.max_queue}.", param="n")
    ids = await asyncio.to_thread(s.encode_messages, req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:  # default: the rest of the context, within the server's cap and its KV budget
        max_tokens = max(0, min(s.context, s.batcher.live.most_positions()) - len(ids))
        max_tokens = min(max_tokens, s.config.max_tokens) or 1  # 0 room: the check below names the budget
    want_logprobs = bool(req.logprobs)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    run = _Run(s, [ids] * n, [s.sampling(req, len(ids), max_tokens, want_logprobs, param, j) for j in range(n)])
    rid, created, name = _new_id("chatcmpl"), int(time.time()), s.model_name

    def logprobs_of(c: _Choice) -> dict | None:
        if not want_logprobs:
            return None
        return {"content": [{"token": text, "logprob": lp, "bytes": raw, "top_logprobs": []}
                            for (text, raw), lp in zip(_token_texts(s.tokenizer, c.completion.ids),
                                                       c.completion.logprobs)],
                "refusal": None}

    if not req.stream:
        finished = await run.collect(request, want_logprobs)
        return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                             "logprobs": logprobs_of(c), "finish_reason": c.finish_reason}
                            for i, c in enumerate(finished)],
                "usage": _usage(len(ids), sum(c.tokens for c in finished))}

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}], **extra}

    async def body() -> AsyncIterator[str]:
        for i in range(n):
            yield _sse(chunk(i, {"role": "assistant", "content": ""}))
        generated = 0
        async for index, delta, c in run.follow(want_logprobs):
            if delta:
                yield _sse(chunk(index, {"content": delta}))
            if c is not None:
                generated += c.tokens
                yield _sse(chunk(index, {}, c.finish_reason, logprobs_of(c)))
        if include_usage:
            yield _sse({**chunk(0, {}), "choices": [], "usage": _usage(len(ids), generated)})
        yield _sse("[DONE]")

    return run.stream(body())


# ---- the app ------------------------------------------------------------------------------------------------------


class _BodyLimit:
    """ASGI middleware: read a request's body up to `max_bytes` (413 beyond, before any parsing), then hand it on."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"The request body is larger than this server's limit of {self.max_bytes} bytes.",
                             code="body_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await too_large.response()(scope, receive, send)
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_bytes:
                return await too_large.response()(scope, receive, send)
            if not message.get("more_body"):
                break
        body, given = b"".join(parts), False

        async def replay():
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the disconnect, when it comes

        await self.app(scope, replay, send)


@asynccontextmanager
async def _lifespan(app: FastAPI):
    batcher = app.state.served.batcher
    batcher.start()
    try:
        yield
    finally:
        await asyncio.to_thread(batcher.stop)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(exc).response()


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return APIError(exc.status_code, str(exc.detail), type=kind, headers=exc.headers).response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return _internal(exc, "Internal error").response()


def create_app(engine: Engine, model_name: str, config: ServeConfig | None = None, **limits: Any) -> FastAPI:
    """The OpenAI-compatible app serving `engine` under the name `model_name`.

    `config` holds the limits (`ServeConfig`); keyword arguments override its fields (`max_queue=8`). The worker
    thread starts and stops with the app's lifespan; `app.state.stats` holds its counters.
    """
    try:
        config = dataclasses.replace(config or ServeConfig(), **limits)
    except TypeError as e:
        fields = ", ".join(f.name for f in dataclasses.fields(ServeConfig))
        raise GemmalabError(f"create_app: {e}; the limits are: {fields}.") from None
    batcher = Batcher(engine, config.max_batch_size, config.max_queue, int(config.kv_cache_gib * 2**30),
                      config.prefill_chunk)
    app = FastAPI(title="gemmalab", summary=f"OpenAI-compatible API for {model_name}", lifespan=_lifespan)
    app.state.served = _Served(engine.tokenizer, batcher, config, model_name, engine.model.config.max_seq_len,
                               int(time.time()))
    app.state.stats, app.state.batcher = batcher.stats, batcher
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(_router)
    app.add_middleware(_BodyLimit, max_bytes=config.max_body_bytes)
    return app


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Iterator[str]:
    """Run `app` under uvicorn on a background thread (port 0: a free one) for the `with` block; yields its base URL.
    For tests, benchmarks and notebooks; `serve` is the foreground server."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.005)
    if not server.started:
        sock.close()
        raise GemmalabError(f"The server did not start on {host}:{port}.")
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def serve(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          config: ServeConfig | None = None, **limits: Any) -> None:
    """Serve `engine` as `model_name` on http://host:port until interrupted (Ctrl-C).

    Binds to 127.0.0.1 unless told otherwise: there is no authentication. `config` and `limits` go to `create_app`.
    """
    import uvicorn

    uvicorn.run(create_app(engine, model_name, config, **limits), host=host, port=port, log_level=log_level)
