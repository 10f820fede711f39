"""What the server's requests may be: the OpenAI request bodies (pydantic), their check against the limits
(`ServeConfig`), and errors in OpenAI's shape."""

from __future__ import annotations

import json
from typing import Any

from gemmalab.errors import GemmalabError
from gemmalab.serve.config import ServeConfig

try:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, field_validator
except ImportError as e:  # the server's dependencies are an optional extra
    raise GemmalabError(
        f"`gemmalab serve` needs FastAPI and uvicorn ({e.name} is missing); install them with "
        "`pip install 'gemmalab[serve]'`."
    ) from None


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


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 turned into OpenAI's 400, naming the first offending field."""
    err = exc.errors()[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return bad_request(f"The request body is not valid JSON ({detail}).".replace(" ()", ""))
    if not loc:  # the body is missing, or JSON but not an object
        return bad_request("The request body must be a JSON object.")
    path = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{path}'.", param=str(loc[0]))
    got = f" (got {json.dumps(err['input'], default=str)[:100]})" if "input" in err else ""
    return bad_request(f"Invalid '{path}': {msg}{got}.", param=str(loc[0]))


# ---- request bodies ---------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields both endpoints share. Unknown fields are ignored (as OpenAI-compatible servers do); fields that
    would change the result but are not implemented are refused in `check_request`."""

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

    @property
    def choices(self) -> int:
        """Choices per prompt (`n`, default 1)."""
        return 1 if self.n is None else self.n

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


class CompletionRequest(SamplingFields):
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


class ChatCompletionRequest(SamplingFields):
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


def check_request(req: SamplingFields, config: ServeConfig) -> None:
    """Refuse what this server does not do (fields that would change the answer) and what is over its limits."""
    values = {**(req.model_extra or {}), **{k: getattr(req, k) for k in _UNSUPPORTED if k in type(req).model_fields}}
    for name, neutral in _UNSUPPORTED.items():
        if name in values and values[name] not in neutral:
            raise bad_request(f"'{name}' is not supported by this server.", param=name)
    fmt = (req.model_extra or {}).get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise bad_request("'response_format' is not supported by this server (only plain text).",
                          param="response_format")
    if not 1 <= req.choices <= config.max_n:
        raise bad_request(f"n must be between 1 and {config.max_n} on this server (got {req.n}).", param="n")
    if len(req.stop) > config.max_stop:
        raise bad_request(f"At most {config.max_stop} stop strings are allowed (got {len(req.stop)}).", param="stop")
    if any(len(s) > config.max_stop_chars for s in req.stop):
        raise bad_request(f"Stop strings may have at most {config.max_stop_chars} characters (got "
                          f"{max(map(len, req.stop))}).", param="stop")
