"""Merge concurrent requests into one pipeline call, as TF Serving's batching does.

Requests queue up while the previous batch runs; a thread takes whatever is queued (up
to `max_batch_size` queries) and runs retrieval and ranking once for all of them. Nothing
waits for a batch to fill, so a lone request pays no added latency, and under load each
model call serves many users while only one thread contends for the GIL with TensorFlow.

With a backend that waits on the network (TF Serving), several threads take batches, so one
slow call does not hold up the others; every backend call is capped at `backend_timeout`
seconds whatever the callers' deadlines. The queue is bounded: past `max_queued_queries`
waiting queries, a request is refused at once (RESOURCE_EXHAUSTED) instead of queueing.

Small requests go first (`_CostQueue`): a lone Recommend waits for the batch running, never
behind every RecommendBatch of 100 users queued before it.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent import futures
from dataclasses import dataclass, field
from typing import Callable, Sequence

from recsys.server.backend import Deadline, remaining
from recsys.server.errors import Cancelled, DeadlineExceeded, Overloaded
from recsys.server.pipeline import Pipeline, RankedList
from recsys.server.validation import Query

log = logging.getLogger("recsys.server")


@dataclass
class _Pending:
    queries: Sequence[Query]
    deadline: Deadline  # the caller's: its expiry, whether it went away, its timings
    future: futures.Future = field(default_factory=futures.Future)
    queued_at: float = field(default_factory=time.perf_counter)


class _CostQueue:
    """Two FIFO queues in one: requests of one query (Recommend) are taken before larger ones
    (RecommendBatch), so cheap calls are not stuck behind expensive ones; among each kind, first
    come first served. A large request waits at most while small ones keep arriving faster than a
    batch runs, and each batch takes as many small ones as it holds."""

    def __init__(self) -> None:
        self._small: deque = deque()
        self._large: deque = deque()
        self._closed = False
        self._ready = threading.Condition()

    def put(self, pending: "_Pending | None") -> None:
        with self._ready:
            if pending is None:
                self._closed = True
            elif len(pending.queries) <= 1:
                self._small.append(pending)
            else:
                self._large.append(pending)
            self._ready.notify()

    def _next(self) -> "_Pending | None":
        if self._small:
            return self._small.popleft()
        if self._large:
            return self._large.popleft()
        if self._closed:
            self._ready.notify()  # wake the next batching thread to see it too
            return None
        raise queue.Empty

    def get(self) -> "_Pending | None":
        """The next request, waiting for one; None once closed and drained."""
        with self._ready:
            self._ready.wait_for(lambda: self._small or self._large or self._closed)
            return self._next()

    def get_nowait(self) -> "_Pending | None":
        with self._ready:
            return self._next()


def _batch_deadline(batch: list[_Pending], cap: float) -> Deadline:
    """The latest of the batch's deadlines, at most `cap` from now: a backend call never outlives
    every caller, nor runs longer than the cap for callers that set no deadline. The batch is
    cancelled once every caller is gone; its timings are copied to each caller's."""
    expiries = [pending.deadline.expires for pending in batch]
    latest = None if None in expiries else max(expiries)
    return Deadline.until(latest, lambda: all(pending.deadline.gone() for pending in batch)).capped(cap)


class RequestBatcher:
    """Same `recommend` call as Pipeline, served by one batching thread."""

    def __init__(self, pipeline: Pipeline, max_batch_size: int, backend_timeout: float, max_queued_queries: int,
                 workers: int = 1, observe_batch: Callable[[int], None] | None = None):
        """`observe_batch` is told each batch's query count (the batch-size metric)."""
        self.pipeline = pipeline
        self.max_batch_size = max_batch_size
        self.backend_timeout = backend_timeout
        self.max_queued_queries = max_queued_queries
        self.observe_batch = observe_batch
        self._queue = _CostQueue()
        self._queued_queries = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, name=f"batcher-{n}", daemon=True) for n in range(workers)]
        for thread in self._threads:
            thread.start()

    def current_catalog(self):
        return self.pipeline.current_catalog()

    def submit(self, queries: Sequence[Query], deadline: Deadline | None = None) -> futures.Future:
        """Queue the queries for the next batch; cancelling the future before it runs drops them."""
        with self._lock:
            if self._queued_queries + len(queries) > self.max_queued_queries:
                raise Overloaded(f"{self._queued_queries} queries are waiting for the models; retry later")
            self._queued_queries += len(queries)
        pending = _Pending(queries, deadline or Deadline())
        self._queue.put(pending)
        return pending.future

    def recommend(self, queries: Sequence[Query], deadline: Deadline | None = None) -> list[RankedList]:
        future = self.submit(queries, deadline)
        try:
            return future.result(remaining(deadline))
        except futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded("deadline exceeded before the recommendation was complete") from None

    def close(self, timeout: float | None = 10.0) -> bool:
        """Stop taking batches and wait up to `timeout` for the running ones (a thread still inside
        TensorFlow when the interpreter exits aborts the process); False if one is still running."""
        self._queue.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads if thread is not threading.current_thread())

    def _take_batch(self, first: _Pending) -> list[_Pending]:
        batch, size = [first], len(first.queries)
        while size < self.max_batch_size:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is None:
                break
            batch.append(pending)
            size += len(pending.queries)
        with self._lock:
            self._queued_queries -= size
        # Callers that timed out or went away while queued cost nothing.
        runnable = []
        for pending in batch:
            if not pending.future.set_running_or_notify_cancel():
                continue  # the caller's deadline passed and it stopped waiting
            if pending.deadline.gone():
                pending.future.set_exception(Cancelled("the caller cancelled the request"))
            else:
                runnable.append(pending)
        return runnable

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = self._take_batch(first)
            if not batch:
                continue
            started = time.perf_counter()
            queries = [query for pending in batch for query in pending.queries]
            if self.observe_batch is not None:
                self.observe_batch(len(queries))
            deadline = _batch_deadline(batch, self.backend_timeout)
            try:
                results = self.pipeline.recommend(queries, deadline)
            except Exception as error:  # noqa: BLE001 - handed to every caller, mapped there
                for pending in batch:
                    pending.future.set_exception(error)
                continue
            offset = 0
            for pending in batch:
                pending.deadline.timings.update(deadline.timings, queue=started - pending.queued_at)
                pending.future.set_result(results[offset:offset + len(pending.queries)])
                offset += len(pending.queries)


class ThreadedPipeline:
    """Batching off: each request runs the pipeline alone, on a thread of a pool."""

    def __init__(self, pipeline: Pipeline, max_workers: int, backend_timeout: float, max_queued_queries: int):
        self.pipeline = pipeline
        self.backend_timeout = backend_timeout
        self.max_queued_queries = max_queued_queries
        self._queued_queries = 0
        self._running = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._executor = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="pipeline")

    def current_catalog(self):
        return self.pipeline.current_catalog()

    def submit(self, queries: Sequence[Query], deadline: Deadline | None = None) -> futures.Future:
        deadline = deadline or Deadline()
        with self._lock:
            if self._queued_queries + len(queries) > self.max_queued_queries:
                raise Overloaded(f"{self._queued_queries} queries are waiting for the models; retry later")
            self._queued_queries += len(queries)
        queued_at = time.perf_counter()

        def run() -> list[RankedList]:
            with self._lock:
                self._queued_queries -= len(queries)
                self._running += 1
            try:
                deadline.timings["queue"] = time.perf_counter() - queued_at
                return self.pipeline.recommend(queries, deadline.capped(self.backend_timeout))
            finally:
                with self._idle:
                    self._running -= 1
                    self._idle.notify_all()

        return self._executor.submit(run)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Drop what is queued and wait up to `timeout` for the running calls; False if one still runs."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout)
