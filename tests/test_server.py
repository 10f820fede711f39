"""`gemmalab serve`: a real uvicorn server on 127.0.0.1 with a tiny random model, driven through real HTTP by the
`openai` client (the happy paths) and by raw httpx (errors, overload, disconnects)."""

import concurrent.futures
import contextlib
import random
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

import gemmalab
from gemmalab.inference import Engine, SamplingParams
from gemmalab.inference.server import create_app
from gemmalab.model import Gemma, get_preset
from gemmalab.tokenizer import train_tokenizer

MODEL = "tiny-gemma3"
PROMPTS = ["kalo mi sa", "ne ru to vi", "ze", "po da fe gu hi ja", "mi mi", "be co wu xo yi ka lo"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Gemma 3 and a 512-piece tokenizer trained on made-up words (both vocab 512)."""
    d = tmp_path_factory.mktemp("serve")
    r = random.Random(0)
    syllables = "ka lo mi ne ru sa to vi ze po da fe gu hi ja be co wu xo yi".split()
    words = ["".join(r.choice(syllables) for _ in range(r.randint(1, 3))) for _ in range(300)]
    lines = [" ".join(r.choice(words) for _ in range(r.randint(3, 12))) + r.choice([".", "!", "?", " 42"])
             for _ in range(500)]
    (d / "corpus.txt").write_text("\n".join(lines))
    tokenizer = train_tokenizer([d / "corpus.txt"], 512, d / "tokenizer")
    model = Gemma(get_preset("tiny-gemma3"))
    model.init_weights(std=0.3, seed=0)
    return model.eval(), tokenizer


class GatedEngine(Engine):
    """An Engine whose batches wait for `gate`: with it closed, tests fill the queue without racing the worker."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.gate.set()

    def generate(self, *args, **kwargs):
        assert self.gate.wait(120), "the test never opened the gate"
        return super().generate(*args, **kwargs)


@contextlib.contextmanager
def running(app):
    """Serve `app` with uvicorn in a background thread on a free 127.0.0.1 port; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    until(lambda: server.started or not thread.is_alive())
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def until(condition, limit_s: float = 60.0) -> None:
    """Wait for `condition()` (the limit only guards against a hang; nothing depends on speed)."""
    end = time.monotonic() + limit_s
    while not condition() and time.monotonic() < end:
        time.sleep(0.005)


@pytest.fixture(scope="module")
def server(tiny):
    model, tokenizer = tiny
    app = create_app(Engine(model, tokenizer, max_batch_size=8), MODEL)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="x", max_retries=0)


def greedy(tiny, prompt, max_new_tokens: int, **kw):
    """The reference: `gemmalab.generate` on the model directly (never while a server is generating)."""
    model, tokenizer = tiny
    return gemmalab.generate(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, **kw)[0]


def chat_ids(tiny, content: str) -> list[int]:
    return tiny[1].apply_chat_template([{"role": "user", "content": content}])


# ---- the openai client --------------------------------------------------------------------------------------------


def test_models_list_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "gemmalab"
    assert httpx.get(server[0] + "/health", timeout=30).json()["status"] == "ok"


def test_completion_greedy_equals_generate(client, tiny):
    expected = [greedy(tiny, p, 10) for p in PROMPTS[:2]]
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].text == expected[0].text and expected[0].text
    assert out.choices[0].finish_reason == expected[0].finish_reason
    assert out.usage.prompt_tokens == len(tiny[1].encode(PROMPTS[0]))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    both = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=10, temperature=0)
    assert [c.text for c in sorted(both.choices, key=lambda c: c.index)] == [e.text for e in expected]


def test_completion_stream_equals_non_stream(client, tiny):
    expected = greedy(tiny, PROMPTS[1], 12)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # it did stream
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(tiny[1].encode(PROMPTS[1]))


def test_chat_non_streaming_and_streaming(client, tiny):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "kalo mi"}]
    expected = greedy(tiny, tiny[1].apply_chat_template(messages), 8)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected.text and expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == len(tiny[1].apply_chat_template(messages))

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=8,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == expected.text
    assert with_choices[-1].choices[0].finish_reason == expected.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == out.usage.total_tokens


def test_stop_strings(client, tiny):
    full = greedy(tiny, PROMPTS[0], 12).text
    stop = full[4:6]
    cut = full[: full.index(stop)]
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop, "@@"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=stop,
                                       stream=True)
    assert "".join(c.choices[0].text for c in chunks) == cut


def test_logprobs(client, tiny):
    model, tokenizer = tiny
    ref = Engine(model, tokenizer).generate([PROMPTS[3]], SamplingParams(max_new_tokens=6, logprobs=True))[0]
    out = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=6, temperature=0, logprobs=0)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4) and len(ref.logprobs) == len(ref.ids)
    assert lp.tokens == [tokenizer.decode([t]) for t in ref.ids]
    assert lp.text_offset[0] == len(PROMPTS[3]) and lp.top_logprobs is None

    messages = [{"role": "user", "content": "ze po"}]
    ref = Engine(model, tokenizer).generate([tokenizer.apply_chat_template(messages)],
                                            SamplingParams(max_new_tokens=6, logprobs=True))[0]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0, logprobs=True)
    assert [t.logprob for t in chat.choices[0].logprobs.content] == pytest.approx(ref.logprobs, abs=1e-4)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                            logprobs=True, stream=True)
    streamed = [t.logprob for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == pytest.approx(ref.logprobs, abs=1e-4)


def test_sampling_with_a_seed_is_reproducible(client):
    kw = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=8, temperature=1.0, top_p=0.9, seed=3,
              extra_body={"top_k": 50})
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


# ---- errors through raw HTTP --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, body, status, param, words", [
    ("/v1/completions", b'{"model": "tiny-gemma3", "prompt": ', 400, None, "not valid JSON"),
    ("/v1/completions", b'[1, 2]', 400, None, "JSON object"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model", "gpt-9"),
    ("/v1/completions", {"model": MODEL, "prompt": "kalo", "max_tokens": 1000}, 400, "max_tokens", "256"),
    ("/v1/completions", {"model": MODEL, "prompt": "kalo", "n": 2}, 400, "n", "n must be 1"),
    ("/v1/completions", {"model": MODEL, "prompt": "kalo", "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "kalo", "temperature": 2.5}, 400, "temperature", "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "kalo", "top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": 5}, 400, "prompt", "prompt must be"),
    ("/v1/completions", {"model": MODEL, "prompt": "kalo", "max_tokens": "many"}, 400, "max_tokens", "integer"),
    ("/v1/completions", {"model": MODEL, "prompt": [[1, 99999]]}, 400, "prompt", "Token ids"),
    ("/v1/completions", {"model": MODEL, "prompt": "kalo", "echo": True}, 400, "echo", "not supported"),
    ("/v1/completions", {"model": MODEL, "prompt": "kalo", "seed": 2**70}, 400, "seed", "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "kalo", "stop": 3}, 400, "stop", "stop must be"),
    ("/v1/completions", {"prompt": "kalo"}, 400, "model", "Missing required parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "bot", "content": "hi"}]}, 400, "messages",
     "'bot'"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "ka " * 300}]}, 400,
     "messages", "256"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "nope"),
    ("/v1/nothing", {}, 404, None, "Not Found"),
    # a JSON escape of a lone surrogate: valid JSON, not encodable text (was a 500 from SentencePiece)
    ("/v1/completions", b'{"model": "%s", "prompt": "ka \\ud800 lo"}' % MODEL.encode(), 400, "prompt", "lone surrogate"),
    ("/v1/chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "\\udfff"}]}' % MODEL.encode(),
     400, "messages", "lone surrogate"),
])
def test_invalid_requests_answer_in_openai_error_shape(server, path, body, status, param, words):
    raw = {"content": body, "headers": {"content-type": "application/json"}}
    kw = raw if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server[0] + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert words in error["message"]
    if status == 404 and param == "model":
        assert error["code"] == "model_not_found"
    if "256" in words:
        assert error["code"] == "context_length_exceeded"


def test_a_client_leaving_mid_stream_does_not_hurt_the_server(server, tiny):
    url, app = server
    body = {"model": MODEL, "prompt": PROMPTS[4], "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # one event, then hang up
    out = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 5}, timeout=30)
    assert out.status_code == 200 and out.json()["choices"][0]["text"] == greedy(tiny, PROMPTS[4], 5).text


# ---- batching and overload ----------------------------------------------------------------------------------------


def test_a_burst_of_concurrent_requests_is_batched_and_matches_one_at_a_time(tiny):
    model, tokenizer = tiny
    engine = GatedEngine(model, tokenizer, max_batch_size=8)
    app = create_app(engine, MODEL, batch_wait_ms=20)
    cases = [(i % 4, PROMPTS[i % len(PROMPTS)], 3 + i % 7) for i in range(24)]  # (kind, prompt, max_tokens)
    expected = [greedy(tiny, chat_ids(tiny, p) if kind >= 2 else p, n).text for kind, p, n in cases]

    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)

        def ask(case) -> str:
            kind, prompt, n = case
            if kind == 0:
                out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
                return out.choices[0].text
            if kind == 1:
                chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True)
                return "".join(c.choices[0].text for c in chunks)
            messages = [{"role": "user", "content": prompt}]
            if kind == 2:
                out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=n, temperature=0)
                return out.choices[0].message.content
            chunks = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=n, temperature=0,
                                                    stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        engine.gate.clear()  # hold the worker until every request is queued, so batching does not race the clients
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            futures = [pool.submit(ask, c) for c in cases]
            until(lambda: app.state.stats.accepted == len(cases))
            engine.gate.set()
            answers = [f.result(timeout=120) for f in futures]

    assert answers == expected
    stats = app.state.stats
    assert stats.accepted == 24 and stats.rejected == 0
    assert 1 < stats.max_batch_size <= 8 and stats.batches < 24


def test_overload_answers_429_and_the_server_stays_up(tiny):
    model, tokenizer = tiny
    engine = GatedEngine(model, tokenizer)
    app = create_app(engine, MODEL, max_queue=2, max_batch_size=1)
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    with running(app) as url:
        engine.gate.clear()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60) for _ in range(8)]
            until(lambda: app.state.stats.accepted + app.state.stats.rejected == 8)
            engine.gate.set()
            responses = [f.result(timeout=120) for f in futures]
        codes = sorted(r.status_code for r in responses)
        # the worker holds one job and the queue two; the rest are refused at once
        assert codes.count(429) == app.state.stats.rejected >= 5
        assert codes.count(200) == app.state.stats.accepted
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json()["error"]["code"] == "queue_full" and refused.headers["retry-after"] == "1"
        later = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert later.status_code == 200 and later.json()["choices"][0]["text"] == greedy(tiny, PROMPTS[0], 4).text
