"""Server lifecycle: the gRPC server (grpc.aio, on an event loop thread of its own), health,
reflection, readiness polling, shutdown. Callers see a plain synchronous object."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Coroutine

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from protos import recommender_pb2, recommender_pb2_grpc
from server.backend import Backend, settle_heap
from server.batching import RequestBatcher, ThreadedPipeline
from server.catalog import CatalogStore
from server.errors import ModelsUnavailable
from server.observability import Metrics, Observer
from server.options import ServerOptions
from server.pipeline import Pipeline
from server.security import BearerTokenInterceptor
from server.servicer import RecommenderServicer

log = logging.getLogger("recsys.server")

SERVICE_NAME = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
LAME_DUCK_QUIET_SECONDS = 0.5
CONNECTION_AGE_GRACE_SECONDS = 30


class EventLoopThread:
    """An asyncio loop on a daemon thread: grpc.aio runs there, everything else submits to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="grpc-aio", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine, timeout: float | None = None) -> Any:
        """Run a coroutine on the loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class ReadinessMonitor:
    """Calls backend.refresh() every poll interval and mirrors the answer into health and metrics.

    Right after a swap (and at start-up, before SERVING) it also loads the new version's
    metadata (`load_catalog`: titles, rated movies) rather than leave it to the first request
    that needs it, and settles the heap (see `settle_heap`)."""

    def __init__(self, backend: Backend, set_health: Callable[[str, int], None], poll_seconds: float,
                 metrics: Metrics, load_catalog: Callable[[], object]):
        self.backend = backend
        self.load_catalog = load_catalog
        self.set_health = set_health
        self.poll_seconds = poll_seconds
        self.metrics = metrics
        self._failures_reported = 0
        self._last_warning = ""
        self._prepared_version: str | None = None  # catalog loaded and heap settled for it
        self._status = health_pb2.HealthCheckResponse.NOT_SERVING
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readiness-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for a model load in progress to finish (see RequestBatcher.close)."""
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def check(self) -> bool:
        try:
            ready = self.backend.refresh()
            version = self.backend.current_version()
            if ready and version != self._prepared_version:  # a swap, or start-up: once per version
                self.load_catalog()
                settle_heap()
                self._prepared_version = version
            self._last_warning = ""
        except ModelsUnavailable as error:  # e.g. no metadata for the version TF Serving serves
            if str(error) != self._last_warning:  # once, not every poll
                log.warning("not ready: %s", error)
            self._last_warning = str(error)
            ready = False
        except Exception:  # noqa: BLE001 - a failed probe means not ready, never a dead monitor
            log.exception("readiness check failed")
            ready = False
        version = self.backend.current_version()
        self.metrics.model_version.set(int(version) if version and version.isdigit() else 0)
        failures = self.backend.load_failures
        if failures > self._failures_reported:
            self.metrics.model_load_failures.inc(failures - self._failures_reported)
            self._failures_reported = failures
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        if not self._stopped.is_set() and status != self._status:
            # Only on change: every set() is pushed to Watch subscribers.
            self._status = status
            for service in ("", SERVICE_NAME):
                self.set_health(service, status)
        return ready

    def _run(self) -> None:
        while not self._stopped.is_set():
            self.check()
            self._stopped.wait(self.poll_seconds)


class RecommenderServer:
    """A grpc.aio server plus what must start and stop with it."""

    def __init__(self, grpc_server: grpc.aio.Server, loop_thread: EventLoopThread,
                 health_servicer: health.aio.HealthServicer, monitor: ReadinessMonitor, backend: Backend,
                 servicer: RecommenderServicer):
        self.grpc_server = grpc_server
        self.loop_thread = loop_thread
        self.health = health_servicer
        self.monitor = monitor
        self.backend = backend
        self.servicer = servicer
        self.metrics = servicer.observer.metrics
        self._stopped = threading.Event()
        self._stopping = False

    def serve_metrics(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose Prometheus metrics over HTTP; returns the bound port (0 picks one)."""
        http_server, _ = start_http_server(port, addr=host, registry=self.metrics.registry)
        self._metrics_http = http_server
        return http_server.server_port

    def start(self) -> None:
        self.loop_thread.run(self.grpc_server.start())
        self.monitor.start()

    def stop(self, grace: float | None) -> threading.Event:
        """Drain: NOT_SERVING and UNAVAILABLE for new calls at once, let in-flight calls finish
        (up to `grace` seconds), then stop the gRPC server. Returns an event set when stopped."""
        if self._stopping:
            return self._stopped
        self._stopping = True
        self.monitor.stop()
        self.loop_thread.run(self.health.enter_graceful_shutdown())
        self.servicer.accepting = False

        def drain() -> None:
            # Lame duck: keep answering (UNAVAILABLE for new calls) until in-flight calls are done
            # and callers have stopped arriving, so no call races the transport shutdown.
            observer = self.servicer.observer
            deadline = time.monotonic() + (grace or 0.0)
            quiet = min(LAME_DUCK_QUIET_SECONDS, (grace or 0.0) / 4)
            while time.monotonic() < deadline and (
                    observer.active_calls or time.monotonic() - observer.last_call_started < quiet):
                time.sleep(0.01)
            self.loop_thread.run(self.grpc_server.stop(max(0.0, deadline - time.monotonic())))
            if getattr(self, "_metrics_http", None) is not None:
                self._metrics_http.shutdown()
            self.servicer.pipeline.close()
            self.monitor.join(LAME_DUCK_QUIET_SECONDS + (grace or 0.0))
            self.backend.close()
            self.loop_thread.close()
            self._stopped.set()

        threading.Thread(target=drain, name="drain", daemon=True).start()
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until stopped; True if `timeout` passed first (grpc.Server's convention)."""
        return not self._stopped.wait(timeout)


def create_server(address: str, backend: Backend, models_dir: Path,
                  options: ServerOptions = ServerOptions()) -> tuple[RecommenderServer, int]:
    """Build (not start) the server on `address`; port 0 binds a free port, which is returned."""
    loop_thread = EventLoopThread()
    observer = Observer()
    pipeline = Pipeline(backend, CatalogStore(models_dir))
    runner = (RequestBatcher(pipeline, options.max_batch_size, observer.metrics.batch_queries.observe)
              if options.max_batch_size > 1
              else ThreadedPipeline(pipeline, options.max_workers))
    servicer = RecommenderServicer(runner, backend, observer, options.lone_calls_inline)

    async def build() -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
        # grpc.aio objects belong to the loop they are created on.
        grpc_server = grpc.aio.server(
            interceptors=[BearerTokenInterceptor(options.auth_token)] if options.auth_token else None,
            options=[("grpc.max_receive_message_length", options.max_request_bytes), ("grpc.so_reuseport", 0)]
            + ([("grpc.max_connection_age_ms", int(options.max_connection_age_seconds * 1000)),
                ("grpc.max_connection_age_grace_ms", CONNECTION_AGE_GRACE_SECONDS * 1000)]
               if options.max_connection_age_seconds > 0 else []),
            maximum_concurrent_rpcs=options.max_concurrent_rpcs,
        )
        recommender_pb2_grpc.add_RecommenderServicer_to_server(servicer, grpc_server)
        health_servicer = health.aio.HealthServicer()
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            grpc_server)
        if options.tls_cert and options.tls_key:
            credentials = grpc.ssl_server_credentials([(options.tls_key, options.tls_cert)])
            return grpc_server, health_servicer, grpc_server.add_secure_port(address, credentials)
        return grpc_server, health_servicer, grpc_server.add_insecure_port(address)

    try:
        grpc_server, health_servicer, port = loop_thread.run(build())
        if port == 0:
            raise OSError(f"could not bind {address}")
    except BaseException:
        runner.close()
        loop_thread.close()
        raise

    def set_health(service: str, status: int) -> None:
        loop_thread.run(health_servicer.set(service, status))

    monitor = ReadinessMonitor(backend, set_health, options.poll_seconds, observer.metrics, pipeline.current_catalog)
    return RecommenderServer(grpc_server, loop_thread, health_servicer, monitor, backend, servicer), port
