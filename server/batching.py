"""Merge concurrent requests into one pipeline call, as TF Serving's batching does.

Requests queue up while the previous batch runs; one thread takes whatever is queued (up
to `max_batch_size` queries) and runs retrieval and ranking once for all of them. Nothing
waits for a batch to fill, so a lone request pays no added latency, and under load each
model call serves many users while only one thread contends for the GIL with TensorFlow.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Callable, Sequence

from server.errors import Cancelled, DeadlineExceeded
from server.pipeline import Pipeline, Query, Recommendation

log = logging.getLogger("recsys.server")


@dataclass
class _Pending:
    queries: Sequence[Query]
    expires: float | None  # time.monotonic() of the caller's deadline
    future: futures.Future = field(default_factory=futures.Future)
    stage_seconds: dict[str, float] | None = None
    is_cancelled: Callable[[], bool] | None = None
    queued_at: float = field(default_factory=time.perf_counter)

    def gone(self) -> bool:
        return self.is_cancelled is not None and self.is_cancelled()


def _batch_timeout(batch: list[_Pending]) -> float | None:
    """The longest remaining deadline in the batch: backend calls never outlive every caller."""
    if any(pending.expires is None for pending in batch):
        return None
    return max(0.0, max(pending.expires for pending in batch) - time.monotonic())


def _run_here(pipeline: Pipeline, queries: Sequence[Query], timeout: float | None,
              stage_seconds: dict[str, float] | None) -> list[list[Recommendation]]:
    if stage_seconds is not None:
        stage_seconds["queue"] = 0.0  # no hand-off, no wait
    return pipeline.recommend(queries, timeout, stage_seconds)


class RequestBatcher:
    """Same `recommend` call as Pipeline, served by one batching thread."""

    def __init__(self, pipeline: Pipeline, max_batch_size: int = 32,
                 observe_batch: Callable[[int], None] | None = None):
        """`observe_batch` is told each batch's query count (the batch-size metric)."""
        self.pipeline = pipeline
        self.max_batch_size = max_batch_size
        self.observe_batch = observe_batch
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._thread.start()

    def current_catalog(self):
        return self.pipeline.current_catalog()

    def submit(self, queries: Sequence[Query], timeout: float | None = None,
               stage_seconds: dict[str, float] | None = None,
               is_cancelled: Callable[[], bool] | None = None) -> futures.Future:
        """Queue the queries for the next batch; cancelling the future before it runs drops them."""
        expires = None if timeout is None else time.monotonic() + timeout
        pending = _Pending(queries, expires, stage_seconds=stage_seconds, is_cancelled=is_cancelled)
        self._queue.put(pending)
        return pending.future

    def recommend(self, queries: Sequence[Query], timeout: float | None = None,
                  stage_seconds: dict[str, float] | None = None,
                  is_cancelled: Callable[[], bool] | None = None) -> list[list[Recommendation]]:
        future = self.submit(queries, timeout, stage_seconds, is_cancelled)
        try:
            return future.result(timeout)
        except futures.TimeoutError:
            future.cancel()
            raise DeadlineExceeded("deadline exceeded before the recommendation was complete") from None

    def run_here(self, queries: Sequence[Query], timeout: float | None = None,
                 stage_seconds: dict[str, float] | None = None) -> list[list[Recommendation]]:
        """Run the queries on the calling thread, as a batch of their own: for a caller that knows
        nothing else is waiting (see RecommenderServicer)."""
        if self.observe_batch is not None:
            self.observe_batch(len(queries))
        return _run_here(self.pipeline, queries, timeout, stage_seconds)

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop taking batches and wait for the running one: a thread still inside TensorFlow
        when the interpreter exits aborts the process."""
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _take_batch(self, first: _Pending) -> list[_Pending]:
        batch, size = [first], len(first.queries)
        while size < self.max_batch_size:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is None:
                self._queue.put(None)
                break
            batch.append(pending)
            size += len(pending.queries)
        # Callers that timed out or went away while queued cost nothing.
        runnable = []
        for pending in batch:
            if not pending.future.set_running_or_notify_cancel():
                continue  # the caller's deadline passed and it stopped waiting
            if pending.gone():
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
            timings: dict[str, float] = {}
            try:
                results = self.pipeline.recommend(queries,
                                                  timeout=_batch_timeout(batch), stage_seconds=timings,
                                                  is_cancelled=lambda batch=batch: all(pending.gone() for pending in batch))
            except Exception as error:  # noqa: BLE001 - handed to every caller, mapped there
                for pending in batch:
                    pending.future.set_exception(error)
                continue
            offset = 0
            for pending in batch:
                if pending.stage_seconds is not None:
                    pending.stage_seconds.update(timings, queue=started - pending.queued_at)
                pending.future.set_result(results[offset:offset + len(pending.queries)])
                offset += len(pending.queries)


class ThreadedPipeline:
    """Batching off: each request runs the pipeline alone, on a thread of a pool."""

    def __init__(self, pipeline: Pipeline, max_workers: int):
        self.pipeline = pipeline
        self._executor = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="pipeline")

    def current_catalog(self):
        return self.pipeline.current_catalog()

    def submit(self, queries: Sequence[Query], timeout: float | None = None,
               stage_seconds: dict[str, float] | None = None,
               is_cancelled: Callable[[], bool] | None = None) -> futures.Future:
        queued_at = time.perf_counter()

        def run() -> list[list[Recommendation]]:
            if stage_seconds is not None:
                stage_seconds["queue"] = time.perf_counter() - queued_at
            return self.pipeline.recommend(queries, timeout, stage_seconds, is_cancelled)

        return self._executor.submit(run)

    def run_here(self, queries: Sequence[Query], timeout: float | None = None,
                 stage_seconds: dict[str, float] | None = None) -> list[list[Recommendation]]:
        return _run_here(self.pipeline, queries, timeout, stage_seconds)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
