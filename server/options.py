"""The server's settings and their defaults, written once: the CLI's flags read them from here.

Importing this module loads neither TensorFlow nor grpc, so `python -m server --help` is quick.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerOptions:
    host: str = "[::]"
    port: int = 50051
    # Threads running the pipeline when batching is off (max_batch_size 1).
    max_workers: int = 16
    poll_seconds: float = 5.0
    # On SIGTERM/SIGINT: in-flight calls get this long to finish before the process exits.
    grace_seconds: float = 10.0
    # Beyond this many RPCs in flight, new ones get RESOURCE_EXHAUSTED (None: no limit).
    max_concurrent_rpcs: int | None = None
    # Larger request messages get RESOURCE_EXHAUSTED.
    max_request_bytes: int = 4 * 1024 * 1024
    # Each client connection is closed (HTTP/2 GOAWAY, in-flight calls get CONNECTION_AGE_GRACE_SECONDS
    # to finish) after this long, so clients re-resolve a DNS name and spread over replicas added
    # since they connected; 0 keeps connections open.
    max_connection_age_seconds: float = 300.0
    # Concurrent requests merged into one model call; 1 turns batching off.
    max_batch_size: int = 32
    # With in-process models, a call that is the only one in flight runs on the event loop
    # instead of being handed to the pipeline thread (lower latency at low load).
    lone_calls_inline: bool = True
    # TensorFlow's two thread pools for in-process models (0: one thread per core); see
    # backend.set_tensorflow_threads for why one each.
    tensorflow_intra_op_parallelism: int = 1
    tensorflow_inter_op_parallelism: int = 1
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    auth_token: str | None = None


DEFAULTS = ServerOptions()
