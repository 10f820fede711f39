"""Load test of `gemmalab serve` on loopback: concurrent clients, valid and hostile requests mixed, slow readers,
clients that hang up, bursts over the queue; a /health probe throughout.

    .venv/bin/python bench/serve_load.py [--model gemma3-270m] [--clients 24] [--requests 400] [--max-queue 16]

The server runs in this process (uvicorn on a thread, 127.0.0.1, a free port); the clients are threads with httpx.
Every valid request's text is checked against the model run alone (greedy, computed before the server starts); a
valid request answered 429 or 503 is retried after a short pause (and counted). Hostile requests must get their
expected 4xx. Reports requests by outcome, p50/p99 latency of the valid ones, the slowest /health answer, peak RSS
above the start and the peak KV cache. tests/reliability/test_server_load.py runs a small version in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from gemmalab.inference import Engine, SamplingParams
from gemmalab.serve import serving


@dataclass
class Case:
    """One request and what it must get."""

    kind: str
    path: str
    body: bytes | dict
    status: int = 200  # the answer it must get (valid: 200, retried over 429/503)
    expected: str | None = None  # the text of a valid greedy request
    stream: bool = False
    slow: bool = False  # a streaming reader that sleeps between chunks
    hang_up: bool = False  # a streaming reader that leaves after the first chunk


@dataclass
class Outcome:
    case: Case
    status: int
    ok: bool
    latency_s: float
    retries: int = 0
    why: str = ""


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    health_latencies: list[float] = field(default_factory=list)
    health_failures: int = 0
    peak_rss_mib: float = 0.0

    def summary(self) -> dict:
        valid = [o for o in self.outcomes if o.case.status == 200 and not o.case.hang_up]
        lat = sorted(o.latency_s for o in valid)
        kinds: dict[str, int] = {}
        for o in self.outcomes:
            kinds[o.case.kind] = kinds.get(o.case.kind, 0) + 1
        return {"requests": len(self.outcomes), "wrong": sum(not o.ok for o in self.outcomes),
                "valid": len(valid), "retried_429_503": sum(o.retries for o in self.outcomes),
                "p50_s": round(statistics.median(lat), 3) if lat else None,
                "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
                "health_probes": len(self.health_latencies), "health_failures": self.health_failures,
                "health_max_s": round(max(self.health_latencies), 3) if self.health_latencies else None,
                "peak_rss_above_start_mib": round(self.peak_rss_mib, 1), "kinds": kinds}


def make_cases(engine: Engine, model_name: str, n: int, seed: int = 0, max_body_bytes: int = 4 * 2**20) -> list[Case]:
    """`n` requests: about 60% valid (completions, chat, streams, slow readers, stop strings), 40% hostile."""
    r = random.Random(seed)
    tok = engine.tokenizer
    words = ["the", "a", "river", "stone", "light", "north", "seven", "quiet", "market", "song", "ka", "lo"]
    texts = [" ".join(r.choice(words) for _ in range(r.randint(2, 12))) for _ in range(12)]
    refs: dict[tuple, str] = {}

    def expected(prompt, max_tokens: int, stop=()) -> str:
        key = (tuple(prompt) if isinstance(prompt, list) else prompt, max_tokens, stop)
        if key not in refs:
            refs[key] = engine.generate([prompt], SamplingParams(max_new_tokens=max_tokens, stop=stop))[0].text
        return refs[key]

    def valid() -> Case:
        text, n_new, kind = r.choice(texts), r.randint(1, 24), r.choice(["cmpl", "cmpl-stream", "chat", "chat-stream",
                                                                         "slow-reader", "stop", "hang-up"])
        if kind.startswith("chat"):
            messages = [{"role": "user", "content": text}]
            body = {"model": model_name, "messages": messages, "max_tokens": n_new, "temperature": 0,
                    "stream": kind == "chat-stream"}
            return Case(kind, "/v1/chat/completions", body, expected=expected(tok.apply_chat_template(messages), n_new),
                        stream=kind == "chat-stream")
        stop = (r.choice(words),) if kind == "stop" else ()
        body = {"model": model_name, "prompt": text, "max_tokens": n_new, "temperature": 0, "stop": list(stop),
                "stream": kind in ("cmpl-stream", "slow-reader", "hang-up")}
        return Case(kind, "/v1/completions", body, expected=expected(text, n_new, stop), stream=body["stream"],
                    slow=kind == "slow-reader", hang_up=kind == "hang-up")

    deep, long = min(100_000, max_body_bytes // 4), min(100_000, max_body_bytes // 8)  # within the body limit
    hostile = [
        ("bad-json", "/v1/completions", b'{"model": "x", "prompt": ', 400),
        ("not-object", "/v1/completions", b"[1, 2, 3]", 400),
        ("huge-body", "/v1/completions", b'{"prompt": "' + b"a" * (max_body_bytes + 10) + b'"}', 413),
        ("deep-json", "/v1/completions", b"[" * deep + b"]" * deep, 400),
        ("huge-int", "/v1/completions", b'{"model": "m", "prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}", 400),
        ("surrogate", "/v1/completions", json.dumps({"model": model_name, "prompt": "a \ud800 b"}).encode(), 400),
        ("many-stops", "/v1/completions", {"model": model_name, "prompt": "a", "stop": ["x"] * 100}, 400),
        ("long-stop", "/v1/completions", {"model": model_name, "prompt": "a", "stop": "y" * 10_000}, 400),
        ("too-many-tokens", "/v1/completions", {"model": model_name, "prompt": "a", "max_tokens": 10**9}, 400),
        ("bad-ids", "/v1/completions", {"model": model_name, "prompt": [[1, 10**9]]}, 400),
        ("big-n", "/v1/completions", {"model": model_name, "prompt": "a", "n": 1000}, 400),
        ("many-prompts", "/v1/completions", {"model": model_name, "prompt": ["a"] * 5000}, 400),
        ("wrong-model", "/v1/completions", {"model": "gpt-9", "prompt": "a"}, 404),
        ("bad-role", "/v1/chat/completions", {"model": model_name, "messages": [{"role": "x", "content": "a"}]}, 400),
        ("long-chat", "/v1/chat/completions",
         {"model": model_name, "messages": [{"role": "user", "content": "river " * long}]}, 400),
    ]
    cases = []
    for _ in range(n):
        if r.random() < 0.6:
            cases.append(valid())
        else:
            kind, path, body, status = r.choice(hostile)
            cases.append(Case(kind, path, body, status))
    return cases


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _send(client: httpx.Client, url: str, c: Case) -> Outcome:
    start, retries = time.perf_counter(), 0
    kw = {"content": c.body, "headers": {"content-type": "application/json"}} if isinstance(c.body, bytes) else {
        "json": c.body}
    while True:
        if not c.stream:
            resp = client.post(url + c.path, **kw)
            status, text = resp.status_code, None
            if status == 200:
                data = resp.json()
                choice = data["choices"][0]
                text = choice["message"]["content"] if "message" in choice else choice["text"]
        else:
            with client.stream("POST", url + c.path, **kw) as resp:
                status, text, parts = resp.status_code, None, []
                if status == 200:
                    for line in resp.iter_lines():
                        if c.hang_up:
                            break
                        if c.slow:
                            time.sleep(0.02)
                        if line.startswith("data: {"):
                            choice = (json.loads(line[6:])["choices"] or [{}])[0]
                            parts.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
                    text = "".join(parts)
                else:
                    resp.read()
        if status in (429, 503) and c.status == 200:
            if status == 429 and "retry-after" not in resp.headers:
                return Outcome(c, status, False, time.perf_counter() - start, retries, "429 without Retry-After")
            retries += 1
            time.sleep(0.05)
            continue
        break
    latency = time.perf_counter() - start
    if status != c.status:
        return Outcome(c, status, False, latency, retries, f"status {status}, wanted {c.status}")
    if c.status == 200 and not c.hang_up and text != c.expected:
        return Outcome(c, status, False, latency, retries, f"text {text!r}, wanted {c.expected!r}")
    if c.status != 200 and not (resp.headers.get("content-type", "").startswith("application/json")
                                and "error" in resp.json()):
        return Outcome(c, status, False, latency, retries, "error not in OpenAI's shape")
    return Outcome(c, status, True, latency, retries)


def run_load(url: str, cases: list[Case], clients: int) -> Report:
    """Send `cases` from `clients` threads while a probe asks /health every 50 ms."""
    report, done = Report(), threading.Event()
    base = _rss_mib()

    def probe() -> None:
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                start = time.perf_counter()
                try:
                    ok = client.get(url + "/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                report.health_latencies.append(time.perf_counter() - start)
                report.health_failures += not ok
                report.peak_rss_mib = max(report.peak_rss_mib, _rss_mib() - base)
                done.wait(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    with httpx.Client(timeout=300, limits=httpx.Limits(max_connections=clients + 4)) as client:
        with ThreadPoolExecutor(clients) as pool:
            report.outcomes = list(pool.map(lambda c: _send(client, url, c), cases))
    done.set()
    prober.join(60)
    return report


def main() -> None:
    import gemmalab
    from gemmalab.dtypes import cpu_description
    from gemmalab.serve import create_app

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma3-270m", help="a model reference (gemmalab.load)")
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    model, tokenizer = gemmalab.load(args.model)
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size)
    cases = make_cases(engine, args.model, args.requests)
    app = create_app(engine, args.model, max_queue=args.max_queue, max_batch_size=args.max_batch_size)
    start = time.perf_counter()
    with serving(app) as url:
        report = run_load(url, cases, args.clients)
    wall = time.perf_counter() - start
    s = report.summary()
    stats = app.state.stats
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; threads {args.threads}; model {args.model}")
    print(json.dumps({**s, "wall_s": round(wall, 1), "completed": stats.completed, "cancelled": stats.cancelled,
                      "rejected_429": stats.rejected, "max_rows_together": stats.max_batch_size,
                      "peak_kv_mib": round(stats.peak_kv_bytes / 2**20, 1)}, indent=1))
    for o in report.outcomes:
        if not o.ok:
            print("WRONG:", o.case.kind, o.why)


if __name__ == "__main__":
    main()
