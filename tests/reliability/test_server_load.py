"""A bounded load test of `gemmalab serve` on loopback (bench/serve_load.py, small): concurrent clients, valid and
hostile requests mixed, slow readers, clients that hang up, a queue small enough to overflow. Nothing crashes, every
valid request gets the text the model gives alone, every hostile one its 4xx in OpenAI's shape, /health answers
throughout, and the KV cache stays within its budget and is freed at the end."""

import importlib.util
import sys
import time
from pathlib import Path

import pytest

from gemmalab.inference import Engine
from gemmalab.inference.live import LiveBatch
from gemmalab.serve import create_app, serving

BENCH = Path(__file__).resolve().parents[2] / "bench" / "serve_load.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("serve_load", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def engine(syllable_model):
    return Engine(*syllable_model)


def test_mixed_load_with_hostile_requests_and_overload(engine):
    bench = load_bench()
    body_limit = 64 * 2**10
    cases = bench.make_cases(engine, "tiny", 160, seed=0, max_body_bytes=body_limit)
    row = LiveBatch(engine, 1).bytes_for(1, engine.model.config.max_seq_len)  # one full-context row
    kv_budget = 4 * row
    app = create_app(engine, "tiny", max_queue=6, max_batch_size=8, max_body_bytes=body_limit,
                     kv_cache_gib=kv_budget / 2**30)
    with serving(app) as url:
        report = bench.run_load(url, cases, clients=16)
        after = bench.httpx.get(url + "/health", timeout=30).json()
        for _ in range(12000):  # the last hang-ups may still be on their way out (a hang guard)
            if after["running"] == after["waiting"] == 0:
                break
            time.sleep(0.01)
            after = bench.httpx.get(url + "/health", timeout=30).json()
    wrong = [(o.case.kind, o.why) for o in report.outcomes if not o.ok]
    assert not wrong
    summary = report.summary()
    kinds = summary["kinds"]
    assert summary["requests"] == 160 and len(kinds) >= 15  # every kind was sent
    assert {"slow-reader", "hang-up", "huge-body", "deep-json", "surrogate"} <= set(kinds)
    assert summary["health_failures"] == 0 and summary["health_probes"] > 0
    stats = app.state.stats
    # 429s depend on scheduling here (test_server.py forces one); any that came had Retry-After and were retried
    assert summary["retried_429_503"] >= stats.rejected
    assert stats.failed == 0 and stats.timed_out == 0
    assert stats.peak_kv_bytes <= kv_budget + row  # the running rows' cache and one joining row's
    assert after["status"] == "ok" and after["kv_bytes"] == 0
    print(summary)
