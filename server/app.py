"""Server lifecycle: the gRPC server, health, reflection, readiness polling, shutdown."""
from __future__ import annotations

import logging
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import recommender_pb2, recommender_pb2_grpc
from server.backend import Backend
from server.catalog import CatalogStore
from server.pipeline import Pipeline
from server.servicer import RecommenderServicer

log = logging.getLogger("recsys.server")

SERVICE_NAME = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
MAX_REQUEST_BYTES = 4 * 1024 * 1024


class ReadinessMonitor:
    """Calls backend.refresh() every poll interval and mirrors the answer into health."""

    def __init__(self, backend: Backend, health_servicer: health.HealthServicer, poll_seconds: float):
        self.backend = backend
        self.health = health_servicer
        self.poll_seconds = poll_seconds
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readiness-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def check(self) -> bool:
        try:
            ready = self.backend.refresh()
        except Exception:  # noqa: BLE001 - a failed probe means not ready, never a dead monitor
            log.exception("readiness check failed")
            ready = False
        if not self._stopped.is_set():
            status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
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
                 monitor: ReadinessMonitor, backend: Backend):
        self.grpc_server = grpc_server
        self.health = health_servicer
        self.monitor = monitor
        self.backend = backend

    def start(self) -> None:
        self.grpc_server.start()
        self.monitor.start()

    def stop(self, grace: float | None) -> threading.Event:
        """NOT_SERVING at once, refuse new calls, let in-flight ones finish within `grace` seconds."""
        self.monitor.stop()
        self.health.enter_graceful_shutdown()
        done = self.grpc_server.stop(grace)
        threading.Thread(target=lambda: (done.wait(), self.backend.close()), daemon=True).start()
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


def create_server(address: str, backend: Backend, models_dir: Path, *, max_workers: int = 16,
                  poll_seconds: float = 5.0) -> tuple[RecommenderServer, int]:
    """Build (not start) the server on `address`; port 0 binds a free port, which is returned."""
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES), ("grpc.so_reuseport", 0)],
    )
    pipeline = Pipeline(backend, CatalogStore(models_dir))
    recommender_pb2_grpc.add_RecommenderServicer_to_server(RecommenderServicer(pipeline, backend), grpc_server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        grpc_server)
    port = grpc_server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    monitor = ReadinessMonitor(backend, health_servicer, poll_seconds)
    return RecommenderServer(grpc_server, health_servicer, monitor, backend), port
