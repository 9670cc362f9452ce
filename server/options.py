"""The server's settings and their defaults, written once: the CLI's flags read them from here.

Importing this module loads neither TensorFlow nor grpc, so `python -m recsys.server --help` is quick.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Which calls get a request log line (`--request-log`): every one, those not ending OK, or none.
REQUEST_LOG_CHOICES = ("all", "errors", "none")

# The embedded interaction store's file, in the user's state directory (XDG_STATE_HOME).
DEFAULT_INTERACTIONS_DB = str(Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
                              / "recsys" / "interactions.sqlite3")


@dataclass(frozen=True)
class ServerOptions:
    host: str = "[::]"
    port: int = 50051
    # Threads running the pipeline when batching is off (max_batch_size 1).
    max_workers: int = 16
    poll_seconds: float = 5.0
    # On SIGTERM/SIGINT: in-flight calls get this long to finish before the process exits.
    grace_seconds: float = 10.0
    # Admission control: Recommender calls in flight beyond this get RESOURCE_EXHAUSTED at once
    # (health checks and Watch streams never count).
    max_concurrent_rpcs: int = 64
    # Queries waiting for the models beyond this get RESOURCE_EXHAUSTED at once.
    max_queued_queries: int = 1024
    # Every backend call is capped at this, whatever the caller's deadline (or none): one caller
    # cannot hold a TF Serving call, and the thread running it, for longer.
    backend_timeout_seconds: float = 3.0
    # Larger request messages get RESOURCE_EXHAUSTED.
    max_request_bytes: int = 4 * 1024 * 1024
    # Each client connection is closed (HTTP/2 GOAWAY, in-flight calls get CONNECTION_AGE_GRACE_SECONDS
    # to finish) after this long, so clients re-resolve a DNS name and spread over replicas added
    # since they connected; 0 keeps connections open.
    max_connection_age_seconds: float = 300.0
    # Client connections open at once; further connections are refused (the listener closes them).
    max_connections: int = 1000
    # A stream still sending this long after its first item (a client that reads nothing) is
    # cancelled; see server/sending.py.
    send_stall_seconds: float = 10.0
    # Concurrent requests merged into one model call; 1 turns batching off.
    max_batch_size: int = 32
    # TensorFlow's two thread pools for in-process models (0: one thread per core); see
    # in_process.set_tensorflow_threads for why one each.
    tensorflow_intra_op_parallelism: int = 1
    tensorflow_inter_op_parallelism: int = 1
    # Where RecordInteractions writes: an SQLite file, a postgresql:// URL (shared by replicas), or
    # "none". The CLI opens it; create_server takes the opened store.
    interactions_db: str = DEFAULT_INTERACTIONS_DB
    # Each user's newest stored interactions merged into every Recommend.
    stored_interactions: int = 100
    # A Recommend waits at most this long for the store's read, then goes on without it (counted).
    store_read_seconds: float = 0.05
    # The store keeps at most this many interactions per user: a write drops that user's oldest.
    max_interactions_per_user: int = 1_000
    # Fill RankedItem.because_item_ids (one more model call per batch).
    reasons: bool = True
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    auth_token: str | None = None
    # PEM public key verifying JWT bearer tokens (scopes, per-user `sub`), and the audience they
    # must name (none: not checked).
    auth_jwt_key: bytes | None = None
    auth_jwt_audience: str | None = None
    # A secret key: logs (requests, erasures) show a keyed hash of each user id instead of the id.
    log_user_id_key: bytes | None = None
    # Which calls get a request log line: "all", "errors" (status not OK) or "none"; metrics count every call.
    request_log: str = "all"


DEFAULTS = ServerOptions()
