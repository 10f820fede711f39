"""`gemmalab serve`: a real uvicorn server on 127.0.0.1 with a tiny random model, driven through real HTTP by the
`openai` client (the happy paths) and by raw httpx (errors, overload, disconnects)."""

import concurrent.futures
import threading
import time

import httpx
import openai
import pytest

import gemmalab
from gemmalab.inference import Engine, SamplingParams
from gemmalab.serve import create_app, serving

MODEL = "tiny-gemma3"
PROMPTS = ["kalo mi sa", "ne ru to vi", "ze", "po da fe gu hi ja", "mi mi", "be co wu xo yi ka lo"]


@pytest.fixture(scope="module")
def tiny(syllable_model):
    return syllable_model


def gate(app) -> threading.Event:
    """Make the app's worker wait at each prefill chunk until the returned event is set: with it cleared, tests fill
    the queue without racing the worker."""
    opened = threading.Event()
    opened.set()
    live = app.state.batcher.live
    feed = live.feed

    def gated_feed(*args, **kwargs):
        assert opened.wait(120), "the test never opened the gate"
        return feed(*args, **kwargs)

    live.feed = gated_feed
    return opened


def until(condition, limit_s: float = 60.0) -> None:
    """Wait for `condition()` (the limit only guards against a hang; nothing depends on speed)."""
    end = time.monotonic() + limit_s
    while not condition() and time.monotonic() < end:
        time.sleep(0.005)


@pytest.fixture(scope="module")
def server(tiny):
    model, tokenizer = tiny
    app = create_app(Engine(model, tokenizer, max_batch_size=8), MODEL)
    with serving(app) as url:
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
    ("/v1/completions", {"model": MODEL, "prompt": "kalo", "n": 9}, 400, "n", "n must be between 1 and 8"),
    ("/v1/completions", {"model": MODEL, "prompt": "kalo", "n": 0}, 400, "n", "n must be between 1 and 8"),
    ("/v1/completions", {"model": MODEL, "prompt": ["kalo"] * 9, "n": 4}, 400, "prompt", "limit of 32"),
    ("/v1/completions", {"model": MODEL, "prompt": "kalo", "stop": ["a"] * 9}, 400, "stop", "At most 8 stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "kalo", "stop": "x" * 257}, 400, "stop", "at most 256 char"),
    ("/v1/completions", {"model": MODEL, "prompt": "kalo", "max_tokens": 5000}, 400, "max_tokens", "at most 4096"),
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
    if words == "256":
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
    app = create_app(Engine(model, tokenizer), MODEL, max_batch_size=8)
    opened = gate(app)
    cases = [(i % 4, PROMPTS[i % len(PROMPTS)], 3 + i % 7) for i in range(24)]  # (kind, prompt, max_tokens)
    expected = [greedy(tiny, chat_ids(tiny, p) if kind >= 2 else p, n).text for kind, p, n in cases]

    with serving(app) as url:
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

        opened.clear()  # hold the worker until every request is queued, so batching does not race the clients
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            futures = [pool.submit(ask, c) for c in cases]
            until(lambda: app.state.stats.accepted == len(cases))
            opened.set()
            answers = [f.result(timeout=120) for f in futures]

    assert answers == expected
    stats = app.state.stats
    assert stats.accepted == 24 and stats.rejected == 0
    assert stats.max_batch_size == 8 and stats.completed == 24 and stats.failed == stats.cancelled == 0
    assert stats.kv_bytes == 0  # every row left, and the cache with them (counted before the last answer went)


def test_overload_answers_429_and_the_server_stays_up(tiny):
    model, tokenizer = tiny
    app = create_app(Engine(model, tokenizer), MODEL, max_queue=2, max_batch_size=1)
    opened = gate(app)
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}
    with serving(app) as url:
        opened.clear()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60) for _ in range(8)]
            until(lambda: app.state.stats.accepted + app.state.stats.rejected == 8)
            opened.set()
            responses = [f.result(timeout=120) for f in futures]
        codes = sorted(r.status_code for r in responses)
        # the worker holds one job and the queue two; the rest are refused at once
        assert codes.count(429) == app.state.stats.rejected >= 5
        assert codes.count(200) == app.state.stats.accepted
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json()["error"]["code"] == "queue_full" and refused.headers["retry-after"] == "1"
        later = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert later.status_code == 200 and later.json()["choices"][0]["text"] == greedy(tiny, PROMPTS[0], 4).text


# ---- limits, faults and continuous batching ------------------------------------------------------------------------


def test_n_choices_and_their_seeds(client, tiny):
    out = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=6, temperature=0, n=3)
    texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    assert texts == [greedy(tiny, p, 6).text for p in PROMPTS[:2] for _ in range(3)]
    sampled = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ze po"}],
                                             max_tokens=8, temperature=1.0, seed=5, n=4)
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ze po"}],
                                           max_tokens=8, temperature=1.0, seed=5, n=4)
    answers = [c.message.content for c in sampled.choices]
    assert answers == [c.message.content for c in again.choices] and len(set(answers)) > 1


def test_limits_on_body_prompt_and_memory(tiny):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer)
    one_row = 2 * model.config.n_layers * model.config.n_kv_heads * model.config.head_dim * 4 * 128  # 128 columns
    app = create_app(engine, MODEL, max_body_bytes=2000, max_prompt_tokens=20, kv_cache_gib=one_row / 2**30)
    with serving(app) as url:
        big = {"model": MODEL, "prompt": "ka " * 1000}
        r = httpx.post(url + "/v1/completions", json=big, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"model": "%s", "prompt": "' % MODEL.encode()
            for _ in range(100):
                yield b"ka " * 10
            yield b'"}'

        r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"},
                       timeout=30)
        assert r.status_code == 413
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "ka lo " * 15}, timeout=30)
        assert r.status_code == 400 and "at most 20" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "ka", "max_tokens": 200}, timeout=30)
        assert r.status_code == 400 and "KV cache" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "ka", "max_tokens": 20, "temperature": 0},
                       timeout=30)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy(tiny, "ka", 20).text
        # chat's default max_tokens (the rest of the context) is cut to what the budget holds, not refused
        r = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "temperature": 0,
                                                          "messages": [{"role": "user", "content": "ka"}]}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["total_tokens"] <= 128


def test_a_client_that_hangs_up_stops_its_row(tiny):
    """A non-streaming client times out and leaves while its row decodes: the row is dropped at the next step,
    instead of generating its 200 tokens for nobody."""
    model, tokenizer = tiny
    app = create_app(Engine(model, tokenizer), MODEL)
    live = app.state.batcher.live
    opened, step = threading.Event(), live.step

    def held_step():
        assert opened.wait(120)
        return step()

    live.step = held_step
    with serving(app) as url:
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
        until(lambda: app.state.batcher.live.rows and all(j.cancelled for j in app.state.batcher._jobs.values()))
        opened.set()
        until(lambda: app.state.stats.cancelled == 1)
        stats = app.state.stats
        assert stats.cancelled == 1 and stats.completed == 0 and stats.steps <= 2 and stats.kv_bytes == 0


def test_a_request_past_its_time_limit_gets_504(tiny):
    model, tokenizer = tiny
    app = create_app(Engine(model, tokenizer), MODEL, request_timeout_s=0.05)
    opened = gate(app)
    with serving(app) as url:
        opened.clear()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(httpx.post, url + "/v1/completions", timeout=60,
                                 json={"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 100, "temperature": 0})
            until(lambda: app.state.stats.accepted == 1)
            time.sleep(0.1)  # past the limit while its prefill is held: it expires before its first token
            opened.set()
            r = future.result(timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert app.state.stats.timed_out == 1 and app.state.stats.completed == 0
        assert httpx.get(url + "/health", timeout=30).json()["kv_bytes"] == 0


def test_internal_errors_do_not_leak_and_a_dead_worker_says_503(tiny):
    model, tokenizer = tiny
    app = create_app(Engine(model, tokenizer), MODEL)

    def broken(prompts):
        raise RuntimeError("/secret/path/to/weights.bin is corrupt")

    app.state.served.encode_prompts = broken
    with serving(app) as url:
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "ka"}, timeout=30)
        assert r.status_code == 500 and "secret" not in r.text and "error " in r.json()["error"]["message"]
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        app.state.batcher.stop()
        health = httpx.get(url + "/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        r = httpx.post(url + "/v1/chat/completions", timeout=30,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "ka"}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
