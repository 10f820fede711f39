"""Continuous batching without a web server: `LiveBatch` (rows joining and leaving a running batch) and `Batcher` (the
server's worker thread: queue, cancellation, time limits, failures that stay with their request, the memory budget)."""

import threading

import pytest

from gemmalab.inference import Engine, SamplingParams
from gemmalab.serve.batcher import Batcher, Job, JobTimeout, NotRunning, Overloaded
from gemmalab.inference.live import COLUMN_STEP, LiveBatch

PROMPTS = ["kalo mi sa", "ne ru to vi", "ze", "po da fe gu hi ja", "mi mi", "be co wu xo yi ka lo"]


@pytest.fixture(scope="module")
def engine(syllable_model):
    return Engine(*syllable_model)


def alone(engine, prompt: str, n: int, **kw):
    return engine.generate([prompt], SamplingParams(max_new_tokens=n, **kw))[0]


class Recorder:
    """A job's events, and a hook run on the worker thread at the job's k-th token."""

    def __init__(self, at_token: int | None = None, hook=None):
        self.text, self.tokens, self.done, self.error = "", 0, threading.Event(), None
        self.completion, self.at_token, self.hook = None, at_token, hook

    def __call__(self, kind, *args):
        if kind == "token":
            self.text += args[0]
            self.tokens += 1
            if self.tokens == self.at_token and self.hook is not None:
                self.hook()
        elif kind == "done":
            self.completion = args[0]
            self.done.set()
        else:
            self.error = args[0]
            self.done.set()


def job(engine, prompt, n, rec, **kw) -> Job:
    ids = prompt if isinstance(prompt, list) else engine.tokenizer.encode(prompt)
    return Job(ids, SamplingParams(max_new_tokens=n, **kw), rec)


def wait(recs, limit_s: float = 120.0):
    for r in recs:
        assert r.done.wait(limit_s), "a job never finished"


@pytest.fixture
def batcher(engine):
    b = Batcher(engine, max_rows=4, max_queue=16)
    b.start()
    yield b
    b.stop()


def test_live_batch_rows_joining_at_different_steps_decode_as_alone(engine):
    """Rows join a running batch at different steps (one prefilled in chunks of 2 tokens), with different lengths and
    sampling; each gets exactly what it gets alone, and the cache is freed when the last leaves."""
    live = LiveBatch(engine, max_rows=4, chunk=2)
    plan = [(0, PROMPTS[0], 12, {}), (0, PROMPTS[1], 5, {}), (3, PROMPTS[3], 10, {}),
            (4, PROMPTS[5], 8, {"temperature": 1.0, "seed": 7}), (6, PROMPTS[2], 9, {"logprobs": True})]
    rows, texts = {}, {}
    for step in range(40):
        for i, (at, prompt, n, kw) in enumerate(plan):
            if at == step:
                p = live.begin(live.new_row(engine.tokenizer.encode(prompt), SamplingParams(max_new_tokens=n, **kw)))
                while p.logits is None:
                    live.feed(p, 2)
                texts[i] = live.place(p)
                rows[i] = p.row
        for ev in live.step():
            assert ev.error is None
            texts[next(i for i, r in rows.items() if r is ev.row)] += ev.delta
        if not live.rows and len(rows) == len(plan):
            break
    assert live.cache is None and live.bytes() == 0
    for i, (_, prompt, n, kw) in enumerate(plan):
        ref = alone(engine, prompt, n, **kw)
        assert rows[i].ids == ref.ids and texts[i] == ref.text
        if kw.get("logprobs"):
            assert rows[i].logprobs == pytest.approx(ref.logprobs, abs=1e-5)


def test_live_batch_grows_for_a_long_row_and_shrinks_when_rows_leave(engine):
    live = LiveBatch(engine, max_rows=8)
    never_stop = dict(stop_ids=())

    def join(prompt, n):
        p = live.begin(live.new_row(prompt, SamplingParams(max_new_tokens=n, **never_stop)))
        live.feed(p, 256)
        live.place(p)
        return p.row

    short = [join([2, 5 + i, 6], 4) for i in range(3)]
    assert live.cache.capacity == COLUMN_STEP and live.cache.batch_size == 4  # slots double: 1, 2, 4
    long = join([2] + [7] * 20, COLUMN_STEP)  # it reaches 149 positions: two steps of columns
    assert live.cache.capacity == 2 * COLUMN_STEP and live.cache.batch_size == 4
    assert live.bytes() == 4 * 2 * COLUMN_STEP * live.token_bytes
    while any(r in live.rows for r in short):
        live.step()
    assert live.cache.batch_size == 1 and live.rows == [long]  # a quarter in use: compacted to the one left
    live.drop(long)
    assert live.cache is None


def test_live_batch_refuses_rows_over_the_budget(engine):
    live = LiveBatch(engine, max_rows=8, budget_bytes=None)
    one_row = live.bytes_for(1, 10)
    budgeted = LiveBatch(engine, max_rows=8, budget_bytes=2 * one_row)
    assert budgeted.fits_alone(2 * COLUMN_STEP)
    assert not LiveBatch(engine, max_rows=8, budget_bytes=one_row).fits_alone(COLUMN_STEP + 1)
    for _ in range(2):
        p = budgeted.begin(budgeted.new_row([2, 5], SamplingParams(max_new_tokens=50, stop_ids=())))
        budgeted.feed(p, 8)
        budgeted.place(p)
    assert len(budgeted.rows) == 2 and not budgeted.fits(10)  # a third waits until one leaves
    assert budgeted.bytes() <= 2 * one_row


def test_a_job_submitted_mid_generation_joins_at_the_next_step(engine, batcher):
    """Job B is submitted from job A's third token (on the worker thread, so the step count is known): it joins at
    the very next turn, decodes beside A, and both get what they get alone."""
    b_rec = Recorder()
    joined_at = {}

    def submit_b():
        joined_at["submitted"] = batcher.stats.steps
        joined_at["job"] = job(engine, PROMPTS[1], 6, b_rec)
        batcher.submit([joined_at["job"]])

    a_rec = Recorder(at_token=3, hook=submit_b)
    a = job(engine, PROMPTS[0], 20, a_rec)
    batcher.submit([a])
    wait([a_rec, b_rec])
    assert a_rec.text == alone(engine, PROMPTS[0], 20).text
    assert b_rec.text == alone(engine, PROMPTS[1], 6).text
    assert batcher.stats.max_batch_size == 2  # they ran together
    # A's token 1 comes from its prefill and tokens 2, 3 from steps 1, 2: B was submitted after step 2 and joined
    # before step 3 (a batch-at-a-time worker would have made it wait for A's 20 tokens)
    assert joined_at["submitted"] == 2 and joined_at["job"].joined_step == 2
    assert b_rec.completion is not None and a_rec.completion.finish_reason == "length"


def test_cancelled_job_leaves_at_once_and_frees_memory(engine, batcher):
    rec = Recorder()
    j = job(engine, PROMPTS[2], 200, rec)
    rec.at_token, rec.hook = 5, lambda: batcher.cancel([j])
    batcher.submit([j])
    other = Recorder()
    batcher.submit([job(engine, PROMPTS[4], 30, other)])
    wait([other])
    assert other.text == alone(engine, PROMPTS[4], 30).text
    assert not rec.done.is_set() and rec.tokens == 5  # nothing more was sent after the cancel
    assert batcher.stats.cancelled == 1 and batcher.stats.completed == 1
    _until_idle(batcher)
    assert batcher.stats.kv_bytes == 0


def _until_idle(batcher):
    for _ in range(12000):  # a hang guard, not a speed check
        if not batcher.live.rows and batcher.stats.waiting == 0 and batcher.stats.kv_bytes == 0:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"the batcher never went idle: {batcher.stats}")


def test_a_failing_job_fails_alone(engine, batcher):
    """A job whose callback raises, and one whose prompt holds an id outside the vocabulary (past the server's
    checks), each end with their own error; the jobs beside them finish exactly as alone."""
    def explode():
        raise RuntimeError("the client's callback broke")

    broken, bad_ids, fine = Recorder(at_token=2, hook=explode), Recorder(), Recorder()
    batcher.submit([job(engine, PROMPTS[0], 10, broken), job(engine, [1, 10**6], 5, bad_ids),
                    job(engine, PROMPTS[3], 12, fine)])
    wait([bad_ids, fine])
    assert isinstance(bad_ids.error, IndexError)
    assert fine.error is None and fine.text == alone(engine, PROMPTS[3], 12).text
    assert broken.completion is None and broken.tokens == 2
    assert batcher.stats.failed == 2 and batcher.stats.completed == 1


def test_time_limit_stops_a_job(engine, batcher):
    rec = Recorder()
    batcher.submit([Job(engine.tokenizer.encode(PROMPTS[0]), SamplingParams(max_new_tokens=50), rec, timeout_s=0)])
    wait([rec])
    assert isinstance(rec.error, JobTimeout) and batcher.stats.timed_out == 1


def test_no_new_tokens_and_the_queue_limit(engine):
    b = Batcher(engine, max_rows=1, max_queue=2)
    with pytest.raises(NotRunning):
        b.submit([job(engine, PROMPTS[0], 1, Recorder())])
    b.start()
    try:
        with pytest.raises(Overloaded):
            b.submit([job(engine, PROMPTS[0], 1, Recorder()) for _ in range(3)])  # all or nothing
        assert b.stats.rejected == 3 and b.stats.accepted == 0
        rec = Recorder()
        b.submit([job(engine, PROMPTS[0], 0, rec)])
        wait([rec])
        assert rec.completion.ids == [] and rec.completion.finish_reason == "length"
    finally:
        b.stop()
    waiting = Recorder()
    with pytest.raises(NotRunning):
        b.submit([job(engine, PROMPTS[0], 1, waiting)])


def test_memory_budget_bounds_the_rows_running_together(engine):
    """A budget of two rows' caches: six jobs never run more than two at a time, and every answer is right."""
    live = LiveBatch(engine, max_rows=8)
    b = Batcher(engine, max_rows=8, max_queue=16, kv_budget_bytes=2 * live.bytes_for(1, COLUMN_STEP))
    b.start()
    try:
        recs = [Recorder() for _ in range(6)]
        b.submit([job(engine, PROMPTS[i], 6 + i, r) for i, r in enumerate(recs)])
        wait(recs)
    finally:
        b.stop()
    assert [r.text for r in recs] == [alone(engine, PROMPTS[i], 6 + i).text for i in range(6)]
    assert b.stats.max_batch_size == 2
    assert b.stats.peak_kv_bytes <= 3 * live.bytes_for(1, COLUMN_STEP)  # two rows and the one joining


def test_stopping_fails_what_is_running_and_waiting(engine):
    b = Batcher(engine, max_rows=1, max_queue=4)
    opened = threading.Event()
    step = b.live.step

    def held_step():
        opened.wait(60)
        return step()

    b.live.step = held_step
    b.start()
    recs = [Recorder() for _ in range(3)]
    b.submit([job(engine, PROMPTS[i], 30, r) for i, r in enumerate(recs)])
    stopper = threading.Thread(target=b.stop)
    stopper.start()
    for _ in range(12000):  # the stop is seen before the held step ends (a hang guard)
        if b._closed:
            break
        threading.Event().wait(0.01)
    opened.set()
    stopper.join(60)
    wait(recs)
    assert all(isinstance(r.error, NotRunning) for r in recs)
    assert not b.alive
