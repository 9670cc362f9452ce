"""Server lifecycle: the gRPC server (grpc.aio, on an event loop thread of its own), health,
reflection, readiness polling, shutdown. Callers see a plain synchronous object."""
from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Coroutine, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, start_http_server

from recsys.server.backend import Backend
from recsys.server.batching import RequestBatcher, ThreadedPipeline
from recsys.server.catalog import CatalogStore
from recsys.server.observability import Metrics, Observer
from recsys.server.options import ServerOptions
from recsys.server.pipeline import Pipeline
from recsys.server.security import AuthenticationInterceptor, Authenticator
from recsys.server.servicer import RecommenderServicer
from recsys.server.store import InteractionStore
from recsys.server.wire import add_recommender_to_server
from recsys.v1 import recommender_pb2

log = logging.getLogger("recsys.server")

SERVICE_NAME = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
LIVENESS_SERVICE = ""
# After the grace, how long stop() still waits for the pipeline's threads before calling it forced.
STOP_SLACK_SECONDS = 0.3
CONNECTION_AGE_GRACE_SECONDS = 30
NETWORK_BATCH_THREADS = 4
# Concurrent streams one client connection may hold (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS): one
# connection's unread streams and health Watch streams are bounded, whatever it asks for.
MAX_STREAMS_PER_CONNECTION = 100


def settle_heap() -> None:
    """Collect garbage once, then freeze what is left (gc.freeze) out of later collections.

    With the models loaded the process tracks ~290k objects, and a full collection over them
    holds the GIL for ~140 ms: every call in flight stalls. Under load Python starts one by
    itself about once a minute. Frozen, the models' objects are skipped, and automatic
    collections scan only what serving allocates (~1-4 ms). Called after each swap (the
    readiness monitor does), it unfreezes first, so the swapped-out version's objects are
    collected, not kept frozen.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


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
    """Calls backend.refresh() every poll interval and mirrors the answer into readiness and metrics.

    The backend swaps a version in only once its metadata has loaded through `load_catalog`
    (so no request pays for parsing it); after a swap, and at start-up, the monitor settles the
    heap (see `settle_heap`). Readiness is the service's own health name; `""` (liveness) says
    only that the process answers."""

    def __init__(self, backend: Backend, set_health: Callable[[str, int], None], poll_seconds: float,
                 metrics: Metrics, load_catalog: Callable[[str], object],
                 counted: Sequence[tuple[Callable[[], int], Counter]] = ()):
        """`counted`: running totals kept elsewhere (backend load failures, store errors), mirrored
        into Prometheus counters at every poll."""
        self.backend = backend
        self.load_catalog = load_catalog
        self.set_health = set_health
        self.poll_seconds = poll_seconds
        self.metrics = metrics
        self._counted = [(lambda: backend.load_failures, metrics.model_load_failures), *counted]
        self._reported = [0] * len(self._counted)
        self._settled_version: str | None = None
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

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def check(self) -> bool:
        try:
            ready = self.backend.refresh(self.load_catalog)
            version = self.backend.current_version()
            if ready and version != self._settled_version:  # a swap, or start-up: once per version
                settle_heap()
                self._settled_version = version
        except Exception:  # noqa: BLE001 - a failed probe means not ready, never a dead monitor
            log.exception("readiness check failed")
            ready = False
        version = self.backend.current_version()
        self.metrics.model_version.set(int(version) if version and version.isdigit() else 0)
        for position, (total, counter) in enumerate(self._counted):
            value = total()
            if value > self._reported[position]:
                counter.inc(value - self._reported[position])
                self._reported[position] = value
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        if not self._stopped.is_set() and status != self._status:
            # Only on change: every set() is pushed to Watch subscribers.
            self._status = status
            self.set_health(SERVICE_NAME, status)
        return ready

    def _run(self) -> None:
        while not self._stopped.is_set():
            self.check()
            self._stopped.wait(self.poll_seconds)


class RecommenderServer:
    """A grpc.aio server plus what must start and stop with it."""

    def __init__(self, grpc_server: grpc.aio.Server, loop_thread: EventLoopThread,
                 health_servicer: health.aio.HealthServicer, monitor: ReadinessMonitor, backend: Backend,
                 servicer: RecommenderServicer, max_request_bytes: int = ServerOptions.max_request_bytes,
                 tls: tuple[bytes, bytes] | None = None):
        """`tls`: (certificate chain, private key) PEM, served by the gRPC port and the HTTP face alike."""
        self.grpc_server = grpc_server
        self.loop_thread = loop_thread
        self.health = health_servicer
        self.monitor = monitor
        self.backend = backend
        self.servicer = servicer
        self.max_request_bytes = max_request_bytes
        self._http_runner = None  # serve_http's
        self.tls = tls
        self.metrics = servicer.observer.metrics
        self._stopped = threading.Event()
        self._stopping = False
        self.forced = False  # set by stop() when work outlived the grace

    def serve_metrics(self, port: int, host: str) -> int:
        """Expose Prometheus metrics over HTTP on `host` (the gRPC listener's, "[::]" style or not);
        returns the bound port (0 picks one)."""
        http_server, _ = start_http_server(port, addr=host.strip("[]") or "::", registry=self.metrics.registry)
        self._metrics_http = http_server
        return http_server.server_port

    def serve_http(self, port: int, host: str) -> int:
        """Serve the JSON/HTTP face (server/rest.py) on `host`, over TLS when the gRPC port is; returns the
        bound port (0 picks one)."""
        from recsys.server.rest import build_app, start_http, tls_context

        app = build_app(self.servicer, self.backend.is_ready, self.max_request_bytes)
        context = tls_context(*self.tls) if self.tls else None
        self._http_runner, bound = self.loop_thread.run(start_http(app, host, port, context))
        return bound

    def start(self) -> None:
        self.loop_thread.run(self.grpc_server.start())
        self.monitor.start()

    def stop(self, grace: float) -> threading.Event:
        """Drain within `grace` seconds; returns an event set once stopped.

        Readiness turns NOT_SERVING and the gRPC server stops taking calls at once: it sends
        HTTP/2 GOAWAY, so clients open new calls on other replicas (the client's retry policy
        covers calls that raced it), while calls in flight get up to `grace` to finish and are
        then cancelled. If work is still running when the grace is over (a backend call that
        does not return), `forced` is set and the caller should exit the process at once."""
        if self._stopping:
            return self._stopped
        self._stopping = True
        deadline = time.monotonic() + grace
        self.monitor.stop()
        self.servicer.accepting = False
        self.loop_thread.run(self.health.enter_graceful_shutdown())

        def drain() -> None:
            self.loop_thread.run(self.grpc_server.stop(grace))
            if self._http_runner is not None:  # its calls went through the servicer, drained above
                self.loop_thread.run(self._http_runner.cleanup())
            if getattr(self, "_metrics_http", None) is not None:
                self._metrics_http.shutdown()
            self.servicer.store_threads.shutdown(wait=False, cancel_futures=True)  # store calls are time-bounded
            self.servicer.similar_threads.shutdown(wait=False, cancel_futures=True)  # so are model calls
            finished = self.servicer.pipeline.close(max(0.0, deadline - time.monotonic()) + STOP_SLACK_SECONDS)
            self.monitor.join(max(0.0, deadline - time.monotonic()))
            self.forced = not finished or self.monitor.is_alive()
            if not self.forced:  # threads inside TensorFlow or a backend call still use these
                self.backend.close()
                self.loop_thread.close()
            self._stopped.set()

        threading.Thread(target=drain, name="drain", daemon=True).start()
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until stopped; True if `timeout` passed first (grpc.Server's convention)."""
        return not self._stopped.wait(timeout)


def create_server(address: str, backend: Backend, models_dir: Path, options: ServerOptions = ServerOptions(),
                  store: InteractionStore | None = None) -> tuple[RecommenderServer, int]:
    """Build (not start) the server on `address`; port 0 binds a free port, which is returned.
    `store`: where RecordInteractions writes and Recommend reads (`options.interactions_db` is for
    the CLI, which opens it)."""
    loop_thread = EventLoopThread()
    observer = Observer(user_id_key=options.log_user_id_key, request_log=options.request_log)
    pipeline = Pipeline(backend, CatalogStore(models_dir), store, options.stored_interactions, options.reasons,
                        options.store_read_seconds)
    if options.max_batch_size > 1:
        # Batches of in-process models run one at a time (TensorFlow uses the cores); TF Serving
        # calls wait on the network, so several may be in flight.
        runner = RequestBatcher(pipeline, options.max_batch_size, options.backend_timeout_seconds,
                                options.max_queued_queries, 1 if backend.in_process else NETWORK_BATCH_THREADS,
                                observer.metrics.batch_queries.observe)
    else:
        runner = ThreadedPipeline(pipeline, options.max_workers, options.backend_timeout_seconds,
                                  options.max_queued_queries)
    authenticator = Authenticator(options.auth_token, options.auth_jwt_key, options.auth_jwt_audience)
    servicer = RecommenderServicer(runner, backend, observer, options.max_concurrent_rpcs, store,
                                   options.stored_interactions, authenticator, options.send_stall_seconds)

    async def build() -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
        # grpc.aio objects belong to the loop they are created on.
        grpc_server = grpc.aio.server(
            interceptors=[AuthenticationInterceptor(authenticator)] if authenticator.required else None,
            options=[("grpc.max_receive_message_length", options.max_request_bytes), ("grpc.so_reuseport", 0),
                     ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
                     ("grpc.max_allowed_incoming_connections", options.max_connections)]
            + ([("grpc.max_connection_age_ms", int(options.max_connection_age_seconds * 1000)),
                ("grpc.max_connection_age_grace_ms", CONNECTION_AGE_GRACE_SECONDS * 1000)]
               if options.max_connection_age_seconds > 0 else []),
        )
        add_recommender_to_server(servicer, grpc_server)
        health_servicer = health.aio.HealthServicer()
        # Liveness ("") is SERVING while the process answers; readiness (the service's name)
        # follows the models and the backend (ReadinessMonitor).
        await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
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

    counted = [(lambda: pipeline.store_reads_failed, observer.metrics.store_reads_failed)]
    if store is not None:
        counted.append((lambda: store.failures, observer.metrics.store_errors))
        counted.append((lambda: store.read_timeouts, observer.metrics.store_read_timeouts))
    monitor = ReadinessMonitor(backend, set_health, options.poll_seconds, observer.metrics, pipeline.catalogs.refreshed,
                               counted)
    tls = (options.tls_cert, options.tls_key) if options.tls_cert and options.tls_key else None
    return RecommenderServer(grpc_server, loop_thread, health_servicer, monitor, backend, servicer,
                             options.max_request_bytes, tls), port
