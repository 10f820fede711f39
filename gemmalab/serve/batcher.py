"""The server's worker: one thread owns the engine and decodes every running request together (continuous batching).

No web framework here (the HTTP app is gemmalab/serve/app.py). A request's prompts become `Job`s in a bounded
queue; `submit` takes all of a request's jobs or none. Each turn of the worker:
1. drops rows whose client left (`cancel`) or whose time ran out (the job gets `JobTimeout`);
2. prefills waiting jobs, about one chunk of prompt tokens per turn, each joining the running batch as soon as its
   prompt is in (a long prompt takes several turns, so running rows keep decoding meanwhile);
3. runs one decode step of every running row and sends each job its new text.
A finished, cancelled or failed row frees its slot at once. A job's own failure (its prefill, its sampling, its
callback) ends that job alone; only a failure of the batched step itself fails the rows in it.

Jobs hear back through `notify(kind, *args)`, called on the worker thread: ("token", text, finish_reason or None),
("done", Completion) after the last token, or ("error", exception). It must not block.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gemmalab.errors import GemmalabError
from gemmalab.inference.engine import Completion, Engine, SamplingParams, _Row
from gemmalab.inference.live import LiveBatch, Prefill

__all__ = ["Batcher", "BatcherStats", "Job", "JobTimeout", "NotRunning", "Overloaded"]

log = logging.getLogger("gemmalab.serve")


class Overloaded(Exception):
    """The queue cannot take the request now; retry later."""


class NotRunning(Exception):
    """The worker is not running (starting up, shutting down, or stopped by a failure)."""


class JobTimeout(Exception):
    """The job ran past its time limit and was stopped."""


@dataclass(eq=False)
class Job:
    """One prompt of one request."""

    prompt: list[int]
    params: SamplingParams
    notify: Callable[..., Any]
    timeout_s: float | None = None  # from submission; None: no limit
    cancelled: bool = False  # set by `Batcher.cancel`: the client left, stop and say nothing more
    deadline: float = field(default=float("inf"), init=False)
    joined_step: int | None = field(default=None, init=False)  # decode steps run when it joined (None: not yet)


@dataclass
class BatcherStats:
    """Counters of the worker (the server shows them at /health)."""

    accepted: int = 0  # jobs taken into the queue
    rejected: int = 0  # jobs refused because the queue was full
    waiting: int = 0  # jobs in the queue now
    running: int = 0  # rows being decoded now
    completed: int = 0
    cancelled: int = 0  # clients that left
    timed_out: int = 0
    failed: int = 0
    steps: int = 0  # decode steps run
    max_batch_size: int = 0  # the most rows decoded together so far
    kv_bytes: int = 0  # keys and values held now (the batch's cache and a joining row's)
    peak_kv_bytes: int = 0


class Batcher:
    """A bounded queue of jobs and the thread that decodes them together on `engine`.

    At most `max_rows` rows run at once, their keys and values within `kv_budget_bytes` (None: unlimited) plus one
    joining row's; at most `max_queue` jobs wait. `prefill_chunk` prompt tokens are prefilled per turn.
    """

    def __init__(self, engine: Engine, max_rows: int = 32, max_queue: int = 64, kv_budget_bytes: int | None = None,
                 prefill_chunk: int = 256):
        if max_queue < 1:
            raise GemmalabError(f"max_queue must be >= 1, got {max_queue}.")
        self.live = LiveBatch(engine, max_rows, kv_budget_bytes, prefill_chunk)
        self.max_queue, self.prefill_chunk = max_queue, prefill_chunk
        self.stats = BatcherStats()
        self._queue: deque[Job] = deque()
        self._jobs: dict[_Row, Job] = {}  # the rows running or joining, and their jobs
        self._joining: tuple[Job, Prefill] | None = None
        self._cond = threading.Condition()
        self._closed = True
        self._thread: threading.Thread | None = None

    # ---- the requests' side -----------------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return not self._closed and self._thread is not None and self._thread.is_alive()

    def fits_alone(self, positions: int) -> bool:
        """Whether a job reaching `positions` (prompt and new tokens) can ever run within the memory budget."""
        return self.live.fits_alone(positions)

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of a request's jobs, or none: `Overloaded` when they do not fit, `NotRunning` when stopped."""
        with self._cond:
            if not self.alive:
                raise NotRunning("The server is not running (starting up or shutting down).")
            if len(self._queue) + len(jobs) > self.max_queue:
                self.stats.rejected += len(jobs)
                raise Overloaded(f"The server is busy: {len(self._queue)} prompts are waiting (at most "
                                 f"{self.max_queue}). Retry later.")
            now = time.monotonic()
            for job in jobs:
                job.deadline = now + job.timeout_s if job.timeout_s is not None else float("inf")
            self._queue.extend(jobs)
            self.stats.accepted += len(jobs)
            self.stats.waiting = len(self._queue)
            self._cond.notify_all()

    def cancel(self, jobs: list[Job]) -> None:
        """The client left: its jobs stop at the next turn (a finished job is not affected)."""
        with self._cond:
            for job in jobs:
                job.cancelled = True
            self._cond.notify_all()

    def start(self) -> None:
        with self._cond:
            self._closed = False
        self._thread = threading.Thread(target=self._work, name="gemmalab-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Refuse new jobs, end the running and waiting ones with `NotRunning`, and wait for the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the worker -------------------------------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while self._turn():
                pass
        except BaseException:  # noqa: BLE001 - a bug in the loop itself: say so, fail everyone, stop
            log.exception("the engine worker stopped")
        finally:
            with self._cond:
                self._closed = True
                waiting = list(self._queue)
                self._queue.clear()
                self.stats.waiting = 0
            running = list(self._jobs.values())
            self._jobs.clear()
            self._joining = None
            self.live.clear()
            self._update_memory()
            for job in running + waiting:
                self._tell(job, "error", NotRunning("The server is shutting down."))

    def _turn(self) -> bool:
        """One turn: drop, admit, decode. False once stopped."""
        with self._cond:
            while not self._closed and not self._queue and self._joining is None and not self._jobs:
                self._cond.wait()
            if self._closed:
                return False
        self._drop_finished_clients()
        self._admit()
        self._decode()
        return True

    def _drop_finished_clients(self) -> None:
        now = time.monotonic()
        with self._cond:
            kept = deque()
            for job in self._queue:
                if job.cancelled:
                    self.stats.cancelled += 1
                elif now >= job.deadline:
                    self._expire(job)
                else:
                    kept.append(job)
            self._queue = kept
            self.stats.waiting = len(kept)
        for row, job in list(self._jobs.items()):
            if job.cancelled or now >= job.deadline:
                self.live.drop(row)  # nothing to drop if it is still joining
                if self._joining is not None and self._joining[0] is job:
                    self._joining = None
                del self._jobs[row]
                self.stats.running = len(self.live.rows)
                self._update_memory()
                if job.cancelled:
                    self.stats.cancelled += 1
                else:
                    self._expire(job)

    def _expire(self, job: Job) -> None:
        self.stats.timed_out += 1
        self._tell(job, "error", JobTimeout(f"The request ran past its {job.timeout_s:g} s limit."))

    def _next_job(self) -> Job | None:
        """The first waiting job, if it can join the batch now (first come, first served)."""
        with self._cond:
            while self._queue and self._queue[0].cancelled:
                self._queue.popleft()
                self.stats.cancelled += 1
            if not self._queue:
                return None
            head = self._queue[0]
            reach = len(head.prompt) + head.params.max_new_tokens
            never = not self.live.fits_alone(reach)  # it would block the queue forever (the app refuses these)
            if not never and not self.live.fits(reach):
                return None  # it waits for rows to finish
            job = self._queue.popleft()
            self.stats.waiting = len(self._queue)
        if never:
            self._fail(job, GemmalabError(f"The request needs {self.live.bytes_for(1, reach) / 2**20:.0f} MiB of "
                                          f"KV cache, over the budget of {self.live.budget / 2**20:.0f} MiB."))
            return self._next_job()
        return job

    def _admit(self) -> None:
        """Prefill about one chunk of prompt tokens: whole short prompts, or the next part of a long one."""
        spent = 0
        while spent < self.prefill_chunk:
            if self._joining is None:
                job = self._next_job()
                if job is None:
                    return
                if job.params.max_new_tokens == 0:  # nothing to generate: no need to read the prompt
                    self._finish_empty(job)
                    continue
                try:
                    p = self.live.begin(self.live.new_row(job.prompt, job.params))
                except Exception as e:  # noqa: BLE001 - its own bad input: it alone fails
                    self._fail(job, e)
                    continue
                self._joining = (job, p)
                self._jobs[p.row] = job
                self._update_memory(p)
            job, p = self._joining
            try:
                spent += self.live.feed(p, self.prefill_chunk - spent)
                self._update_memory(p)
                if p.logits is None:
                    return  # the rest of this prompt in the next turns
                self._joining = None
                if time.monotonic() >= job.deadline:  # its time ran out while its prompt was read
                    self._jobs.pop(p.row, None)
                    self._update_memory()
                    self._expire(job)
                    continue
                job.joined_step = self.live.steps
                delta = self.live.place(p)
                self._update_memory()
            except Exception as e:  # noqa: BLE001
                self._joining = None
                self._jobs.pop(p.row, None)
                self.live.drop(p.row)
                self._fail(job, e)
                continue
            self.stats.max_batch_size = max(self.stats.max_batch_size, len(self.live.rows))
            self.stats.running = len(self.live.rows)
            self._deliver(job, p.row, delta)

    def _decode(self) -> None:
        if not self.live.rows:
            return
        self.stats.running = len(self.live.rows)
        try:
            events = self.live.step()
        except Exception as e:  # noqa: BLE001 - the batched step itself failed: every row in it fails
            log.exception("a decode step of %d rows failed", len(self.live.rows))
            rows = self.live.rows
            self.live.clear()  # all at once: dropping row by row would rebuild (allocate) the cache on the way
            self.stats.running = 0
            self._update_memory()
            for row in rows:
                job = self._jobs.pop(row, None)
                if job is not None:
                    self._fail(job, e)
            return
        self.stats.steps += 1
        self.stats.running = len(self.live.rows)
        self._update_memory()  # before the jobs hear of it: a finished job sees its memory already freed
        for ev in events:
            job = self._jobs.get(ev.row)
            if job is None:
                continue
            if ev.error is not None:
                del self._jobs[ev.row]
                log.error("a row failed: %r", ev.error)
                self._fail(job, ev.error)
            else:
                self._deliver(job, ev.row, ev.delta)
        self.stats.running = len(self.live.rows)
        self._update_memory()  # a callback that failed dropped its row

    def _deliver(self, job: Job, row, delta: str) -> None:
        """Send a row's new text; at its end, its Completion. A callback that fails ends its own job."""
        try:
            job.notify("token", delta, row.finish_reason)
            if row.finish_reason is not None:
                self._jobs.pop(row, None)
                self.stats.completed += 1
                job.notify("done", row.completion())
        except Exception as e:  # noqa: BLE001
            log.exception("a job's callback failed")
            self._jobs.pop(row, None)
            self.live.drop(row)
            self._fail(job, e)

    def _finish_empty(self, job: Job) -> None:
        self.stats.completed += 1
        self._tell(job, "done", Completion(job.prompt, [], "", "length"))

    def _fail(self, job: Job, error: Exception) -> None:
        self.stats.failed += 1
        self._tell(job, "error", error)

    @staticmethod
    def _tell(job: Job, *event: Any) -> None:
        if job.cancelled:
            return
        try:
            job.notify(*event)
        except Exception:  # noqa: BLE001 - nobody left to tell
            log.exception("a job's callback failed")

    def _update_memory(self, joining: Prefill | None = None) -> None:
        joining = joining or (self._joining[1] if self._joining else None)
        self.stats.kv_bytes = self.live.bytes() + (joining.cache.bytes() if joining else 0)
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, self.stats.kv_bytes)
