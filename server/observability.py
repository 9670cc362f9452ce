"""One structured log line and Prometheus metrics per request, and the thread that writes the log."""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterable, TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from recsys.server.options import REQUEST_LOG_CHOICES
from recsys.server.security import ANYONE, Principal

request_log = logging.getLogger("recsys.requests")

# Log lines waiting for a stuck stderr (100,000 request lines hold ~45 MiB); beyond this they are dropped.
MAX_QUEUED_LOG_LINES = 100_000

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class CallRecord:
    """What one RPC did; filled in by the servicer and the pipeline, logged when it ends."""

    method: str
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    user_ids: list[str] = field(default_factory=list)
    item_count: int = 0
    fallback_count: int = 0
    model_version: str = ""
    interaction_count: int = 0  # recent_interactions sent (one per movie)
    unknown_interaction_count: int = 0  # ... of movies the models do not know (ignored)
    stored_interaction_count: int = 0  # merged in from the interaction store
    stage_seconds: dict[str, float] = field(default_factory=dict)
    principal: Principal = ANYONE  # who called (server/security.py)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (several servers may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("recsys_requests", "RPCs handled, by method and gRPC status code",
                                ["method", "code"], registry=self.registry)
        self.latency = Histogram("recsys_stage_latency_seconds",
                                 "Latency of the model calls (models in process; retrieval, ranking behind "
                                 "TF Serving), of the wait for the pipeline thread (queue), of sending a "
                                 "Recommend call's items (stream) and per request (total)",
                                 ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_queries = Histogram("recsys_batch_queries",
                                       "Queries per batch: concurrent requests merged into one pipeline run, "
                                       "one model call for their known users (--max-batch-size)",
                                       buckets=BATCH_BUCKETS, registry=self.registry)
        self.fallback_items = Counter("recsys_fallback_items", "Items served from the popularity fallback",
                                      registry=self.registry)
        self.model_version = Gauge("recsys_model_version", "Model version being served (0 = none yet)",
                                   registry=self.registry)
        self.model_load_failures = Counter("recsys_model_load_failures",
                                           "Model versions that failed to load or answer their warmup",
                                           registry=self.registry)
        self.store_errors = Counter("recsys_store_errors",
                                    "Interaction store calls that failed (the store down or broken); Recommend "
                                    "then goes on with the request's own interactions", registry=self.registry)
        self.store_reads_failed = Counter("recsys_store_reads_failed",
                                          "Recommend batches served without their stored interactions (store failed "
                                          "or paused after a failure)", registry=self.registry)
        self.store_read_timeouts = Counter("recsys_store_read_timeouts",
                                           "Store reads for Recommend that ran out of their budget (--store-read-ms) "
                                           "or found every read thread busy", registry=self.registry)
        self.stalled_streams = Counter("recsys_stalled_streams",
                                       "Streams cancelled because their client read nothing for --send-stall-seconds",
                                       registry=self.registry)
        self.log_lines_dropped = Gauge("recsys_log_lines_dropped",
                                       "Log lines dropped since start, written while stderr was "
                                       f"{MAX_QUEUED_LOG_LINES:,} lines behind (python -m recsys.server)",
                                       registry=self.registry)


class Observer:
    def __init__(self, metrics: Metrics | None = None, user_id_key: bytes | None = None, request_log: str = "all"):
        """`user_id_key`: log a keyed hash (HMAC-SHA256, 16 hex digits) of each user id instead of the
        id: lines of one user still group together, and nobody without the key can tell whose they are.
        `request_log`: which calls get a line (REQUEST_LOG_CHOICES); the metrics always count every call."""
        if request_log not in REQUEST_LOG_CHOICES:
            raise ValueError(f"request_log must be one of {REQUEST_LOG_CHOICES}, not {request_log!r}")
        self.metrics = metrics or Metrics()
        self.user_id_key = user_id_key
        self.request_log = request_log
        self._active = 0
        self.last_call_started = 0.0  # time.monotonic()
        self._lock = threading.Lock()

    @property
    def active_calls(self) -> int:
        return self._active

    def begin(self, method: str, metadata: Iterable[tuple[str, str]] | None) -> CallRecord:
        """`metadata`: the call's invocation metadata (key, value) pairs."""
        with self._lock:
            self._active += 1
            self.last_call_started = time.monotonic()
        # A caller-supplied request id ties our log line to theirs.
        supplied = dict(metadata or ()).get("x-request-id", "")
        request_id = supplied[:64] if supplied.isprintable() and supplied else uuid.uuid4().hex[:16]
        return CallRecord(method=method, request_id=request_id)

    def logged_user_id(self, user_id: str) -> str:
        """The user id as logs show it: itself, or its keyed hash."""
        if self.user_id_key is None or not user_id:
            return user_id
        return hmac.new(self.user_id_key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:16]

    def finish(self, record: CallRecord, code: str) -> None:
        """`code`: the gRPC status code's name (OK, INVALID_ARGUMENT, ...)."""
        with self._lock:
            self._active -= 1
        total = time.perf_counter() - record.started
        metrics = self.metrics
        metrics.requests.labels(record.method, code).inc()
        metrics.latency.labels("total").observe(total)
        for stage, seconds in record.stage_seconds.items():
            metrics.latency.labels(stage).observe(seconds)
        if record.fallback_count:
            metrics.fallback_items.inc(record.fallback_count)
        if self.request_log == "none" or self.request_log == "errors" and code == "OK":
            return
        user_ids = [self.logged_user_id(user_id) for user_id in record.user_ids[:5]]
        request_log.info(json.dumps({
            "request_id": record.request_id,
            "method": record.method,
            "user_id": user_ids[0] if len(record.user_ids) == 1 else user_ids,
            "users": len(record.user_ids),
            "status": code,
            "items": record.item_count,
            "fallback_items": record.fallback_count,
            "interactions": record.interaction_count,
            "unknown_interactions": record.unknown_interaction_count,
            "stored_interactions": record.stored_interaction_count,
            "model_version": record.model_version,
            "ms": {"total": round(total * 1000, 3),
                   **{stage: round(seconds * 1000, 3) for stage, seconds in record.stage_seconds.items()}},
        }, ensure_ascii=False))


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """Never blocks the logging call: with the queue full, the record is dropped and counted."""

    def __init__(self, lines: queue.Queue):
        super().__init__(lines)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class ThreadedLogWriter:
    """Writes a logger's records to a stream (stderr) from a thread of its own.

    Written from the event loop, a blocking write (a log reader that fell behind, a full pipe)
    would stall every call. Queued here instead; if the stream stays stuck for
    `max_queued` lines, further records are dropped and counted rather than block or grow
    memory without bound.
    """

    def __init__(self, logger: logging.Logger, line_format: str, stream: TextIO | None = None,
                 max_queued: int = MAX_QUEUED_LOG_LINES):
        self._lines: queue.Queue[logging.LogRecord | None] = queue.Queue(max_queued)
        self._handler = _DroppingQueueHandler(self._lines)
        self._target = logging.StreamHandler(stream or sys.stderr)
        self._target.setFormatter(logging.Formatter(line_format))
        self._thread = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self._thread.start()
        self._logger = logger
        logger.addHandler(self._handler)

    @property
    def dropped(self) -> int:
        return self._handler.dropped

    def _write(self) -> None:
        while (record := self._lines.get()) is not None:
            self._target.handle(record)

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is still queued, waiting at most `timeout` seconds for a stuck stream."""
        self._logger.removeHandler(self._handler)
        deadline = time.monotonic() + timeout
        try:
            self._lines.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(max(0.0, deadline - time.monotonic()))
