"""Server lifecycle: the gRPC server, health, reflection, readiness polling, shutdown."""
from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from protos import recommender_pb2, recommender_pb2_grpc
from server.backend import Backend
from server.batching import RequestBatcher
from server.catalog import CatalogStore
from server.observability import Metrics, Observer
from server.pipeline import Pipeline
from server.security import BearerTokenInterceptor
from server.servicer import RecommenderServicer

log = logging.getLogger("recsys.server")

SERVICE_NAME = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
MAX_REQUEST_BYTES = 4 * 1024 * 1024
LAME_DUCK_QUIET_SECONDS = 0.5


class ReadinessMonitor:
    """Calls backend.refresh() every poll interval and mirrors the answer into health and metrics."""

    def __init__(self, backend: Backend, health_servicer: health.HealthServicer, poll_seconds: float,
                 metrics: Metrics):
        self.backend = backend
        self.health = health_servicer
        self.poll_seconds = poll_seconds
        self.metrics = metrics
        self._failures_reported = 0
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
                self.health.set(service, status)
        return ready

    def _run(self) -> None:
        while not self._stopped.is_set():
            self.check()
            self._stopped.wait(self.poll_seconds)


class RecommenderServer:
    """A grpc.Server plus what must start and stop with it."""

    def __init__(self, grpc_server: grpc.Server, health_servicer: health.HealthServicer,
                 monitor: ReadinessMonitor, backend: Backend, servicer: RecommenderServicer):
        self.grpc_server = grpc_server
        self.health = health_servicer
        self.monitor = monitor
        self.backend = backend
        self.servicer = servicer
        self.metrics = servicer.observer.metrics

    def serve_metrics(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose Prometheus metrics over HTTP; returns the bound port (0 picks one)."""
        http_server, _ = start_http_server(port, addr=host, registry=self.metrics.registry)
        self._metrics_http = http_server
        return http_server.server_port

    def start(self) -> None:
        self.grpc_server.start()
        self.monitor.start()

    def stop(self, grace: float | None) -> threading.Event:
        """Drain: NOT_SERVING and UNAVAILABLE for new calls at once, let in-flight calls finish
        (up to `grace` seconds), then stop the gRPC server. Returns an event set when stopped."""
        self.monitor.stop()
        self.health.enter_graceful_shutdown()
        self.servicer.accepting = False
        stopped = threading.Event()

        def drain() -> None:
            # Lame duck: keep answering (UNAVAILABLE for new calls) until in-flight calls are done
            # and callers have stopped arriving, so no call races the transport shutdown.
            observer = self.servicer.observer
            deadline = time.monotonic() + (grace or 0.0)
            quiet = min(LAME_DUCK_QUIET_SECONDS, (grace or 0.0) / 4)
            while time.monotonic() < deadline and (
                    observer.active_calls or time.monotonic() - observer.last_call_started < quiet):
                time.sleep(0.01)
            self.grpc_server.stop(max(0.0, deadline - time.monotonic())).wait()
            if getattr(self, "_metrics_http", None) is not None:
                self._metrics_http.shutdown()
            if isinstance(self.servicer.pipeline, RequestBatcher):
                self.servicer.pipeline.close()
            self.monitor.join(LAME_DUCK_QUIET_SECONDS + (grace or 0.0))
            self.backend.close()
            stopped.set()

        threading.Thread(target=drain, name="drain", daemon=True).start()
        return stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


@dataclass(frozen=True)
class ServerOptions:
    max_workers: int = 16
    poll_seconds: float = 5.0
    # Beyond this many RPCs in flight, new ones get RESOURCE_EXHAUSTED (None: no limit).
    max_concurrent_rpcs: int | None = None
    # Larger request messages get RESOURCE_EXHAUSTED.
    max_request_bytes: int = MAX_REQUEST_BYTES
    # Concurrent requests merged into one model call; 1 turns batching off.
    max_batch_size: int = 32
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    auth_token: str | None = None


def create_server(address: str, backend: Backend, models_dir: Path,
                  options: ServerOptions = ServerOptions()) -> tuple[RecommenderServer, int]:
    """Build (not start) the server on `address`; port 0 binds a free port, which is returned."""
    interceptors = [BearerTokenInterceptor(options.auth_token)] if options.auth_token else []
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix="rpc"),
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", options.max_request_bytes), ("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=options.max_concurrent_rpcs,
    )
    observer = Observer()
    pipeline = Pipeline(backend, CatalogStore(models_dir))
    if options.max_batch_size > 1:
        pipeline = RequestBatcher(pipeline, options.max_batch_size)
    servicer = RecommenderServicer(pipeline, backend, observer)
    recommender_pb2_grpc.add_RecommenderServicer_to_server(servicer, grpc_server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        grpc_server)
    if options.tls_cert and options.tls_key:
        port = grpc_server.add_secure_port(address, grpc.ssl_server_credentials([(options.tls_key, options.tls_cert)]))
    else:
        port = grpc_server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    monitor = ReadinessMonitor(backend, health_servicer, options.poll_seconds, observer.metrics)
    return RecommenderServer(grpc_server, health_servicer, monitor, backend, servicer), port
