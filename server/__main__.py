"""python -m recsys.server: serve recommendations over gRPC from exported models."""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

from recsys.server import start_tensorflow
from recsys.server.layout import (
    DEFAULT_SIGNATURE,
    EXPLAIN_SIGNATURE,
    INCLUDE_RATED_SIGNATURE,
    RANKING_MODEL,
    RATED_ITEMS_SIGNATURE,
    RETRIEVAL_MODEL,
    SIMILAR_ITEMS_SIGNATURE,
)
from recsys.server.options import DEFAULTS, REQUEST_LOG_CHOICES, ServerOptions

# The process exits within --grace-seconds plus this, even when shutdown had to be forced.
EXIT_SLACK_SECONDS = 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m recsys.server", description=__doc__)
    parser.add_argument("--models", required=True, type=Path,
                        help="models directory written by 'python -m recsys.export train' (SavedModels and item metadata)")
    parser.add_argument("--host", default=DEFAULTS.host, help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULTS.port,
                        help="port to listen on; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--model-version", type=int,
                        help="serve this version instead of the newest (with --tf-serving: pin it in every request)")
    tf_serving = parser.add_argument_group("TF Serving backend (instead of loading the models in-process)")
    tf_serving.add_argument("--tf-serving", metavar="HOST:PORT",
                            help="call both stages through this TF Serving's gRPC PredictionService; item metadata "
                                 "still comes from --models")
    tf_serving.add_argument("--retrieval-model", default=RETRIEVAL_MODEL, help="TF Serving model name (default: %(default)s)")
    tf_serving.add_argument("--ranking-model", default=RANKING_MODEL, help="TF Serving model name (default: %(default)s)")
    tf_serving.add_argument("--retrieval-signature", default=DEFAULT_SIGNATURE,
                            help="signature that excludes rated movies (default: %(default)s)")
    tf_serving.add_argument("--include-rated-signature", default=INCLUDE_RATED_SIGNATURE,
                            help="retrieval signature used when a request sets include_rated (default: %(default)s)")
    tf_serving.add_argument("--ranking-signature", default=DEFAULT_SIGNATURE, help="ranking signature (default: %(default)s)")
    tf_serving.add_argument("--similar-items-signature", default=SIMILAR_ITEMS_SIGNATURE,
                            help="retrieval signature for SimilarItems (default: %(default)s)")
    tf_serving.add_argument("--explain-signature", default=EXPLAIN_SIGNATURE,
                            help="ranking signature giving the reasons (because_item_ids) (default: %(default)s)")
    tf_serving.add_argument("--rated-items-signature", default=RATED_ITEMS_SIGNATURE,
                            help="retrieval signature giving each user's training history, which the popularity "
                                 "fill leaves out (default: %(default)s)")
    threads = parser.add_argument_group("TensorFlow thread pools (in-process models)")
    threads.add_argument("--tensorflow-intra-op-parallelism", type=int, default=DEFAULTS.tensorflow_intra_op_parallelism,
                         metavar="N", help="threads one op may split over; 0 = one per core. 1 suits small models on few cores; "
                              "raise it for catalogs of millions of movies on a bigger machine (default: %(default)s)")
    threads.add_argument("--tensorflow-inter-op-parallelism", type=int, default=DEFAULTS.tensorflow_inter_op_parallelism,
                         metavar="N",
                         help="threads running independent ops side by side; 0 = one per core (default: %(default)s)")
    parser.add_argument("--poll-seconds", type=float, default=DEFAULTS.poll_seconds,
                        help="how often to look for a new model version / probe the backend (default: %(default)s)")
    parser.add_argument("--grace-seconds", type=float, default=DEFAULTS.grace_seconds,
                        help="on SIGTERM/SIGINT: NOT_SERVING and UNAVAILABLE for new calls at once, in-flight calls "
                             "finish, exit within this many seconds (default: %(default)s)")
    parser.add_argument("--max-workers", type=int, default=DEFAULTS.max_workers,
                        help="threads running the pipeline when batching is off (--max-batch-size 1); RPCs run on "
                             "one grpc.aio event loop (default: %(default)s)")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-concurrent-rpcs", type=int, default=DEFAULTS.max_concurrent_rpcs,
                        help="Recommender calls at work (validating, in the models or the store) beyond this get "
                             "RESOURCE_EXHAUSTED at once; streams sending what they have and health checks never "
                             "count (default: %(default)s)")
    limits.add_argument("--max-queued-queries", type=int, default=DEFAULTS.max_queued_queries,
                        help="queries waiting for the models beyond this get RESOURCE_EXHAUSTED at once "
                             "(default: %(default)s)")
    limits.add_argument("--backend-timeout-seconds", type=float, default=DEFAULTS.backend_timeout_seconds,
                        help="cap on every model call (TF Serving: every Predict), whatever the caller's deadline "
                             "(default: %(default)s)")
    limits.add_argument("--max-batch-size", type=int, default=DEFAULTS.max_batch_size,
                        help="merge up to this many concurrent requests into one model call; 1 = no batching "
                             "(default: %(default)s)")
    limits.add_argument("--max-request-bytes", type=int, default=DEFAULTS.max_request_bytes,
                        help="larger request messages get RESOURCE_EXHAUSTED (default: %(default)s)")
    parser.add_argument("--max-connection-age-seconds", type=float, default=DEFAULTS.max_connection_age_seconds,
                        help="close each client connection after this long (GOAWAY; in-flight calls finish, "
                             "clients reconnect on their own) so clients of a DNS name spread over replicas "
                             "added since; 0 = never, and then what clients never read stays in memory until "
                             "they disconnect (default: %(default)s)")
    limits.add_argument("--max-connections", type=int, default=DEFAULTS.max_connections,
                        help="client connections open at once; more are closed on arrival (default: %(default)s)")
    limits.add_argument("--send-stall-seconds", type=float, default=DEFAULTS.send_stall_seconds,
                        help="cancel a stream still sending this long after its first item (its client reads "
                             "nothing) (default: %(default)s)")
    security = parser.add_argument_group("security")
    security.add_argument("--tls-cert", type=Path, help="PEM certificate chain; with --tls-key, serve TLS only")
    security.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    security.add_argument("--auth-token-file", type=Path,
                          help="file holding a token; calls without 'authorization: Bearer <token>' metadata get "
                               "UNAUTHENTICATED (the health service stays open for probes)")
    security.add_argument("--auth-jwt-key", type=Path,
                          help="PEM public key (RS256, ES256 or EdDSA) verifying JWT bearer tokens: 'exp' required, "
                               "'scope' grants recommend, record, forget; a 'sub' binds the token to that user id")
    security.add_argument("--auth-jwt-audience", metavar="AUD",
                          help="with --auth-jwt-key: tokens must name this audience ('aud')")
    store = parser.add_argument_group("interaction store (RecordInteractions, ForgetUser)")
    store.add_argument("--interactions-db", default=DEFAULTS.interactions_db, metavar="PATH|URL|none",
                       help="where recorded interactions live: an SQLite file (created if missing; one server), a "
                            "postgresql://user@host/db URL (shared by replicas), or none (default: %(default)s)")
    store.add_argument("--stored-interactions", type=int, default=DEFAULTS.stored_interactions, metavar="N",
                       help="merge each user's newest N stored interactions into every Recommend "
                            "(default: %(default)s)")
    store.add_argument("--store-read-ms", type=float, default=DEFAULTS.store_read_seconds * 1000, metavar="MS",
                       help="a Recommend waits at most this long for its stored interactions, then goes on without "
                            "them (counted in recsys_store_reads_failed) (default: %(default)s)")
    store.add_argument("--max-interactions-per-user", type=int, default=DEFAULTS.max_interactions_per_user,
                       metavar="N", help="keep at most N stored interactions per user; a write drops that user's "
                                         "oldest beyond it (default: %(default)s)")
    parser.add_argument("--reasons", action=argparse.BooleanOptionalAction, default=DEFAULTS.reasons,
                        help="give every model item its because_item_ids, the movies of the user's history that "
                             "raise its score the most (one more model call per batch) (default: on)")
    parser.add_argument("--log-user-id-key-file", type=Path, metavar="F",
                        help="file holding a secret key: request and audit logs show a keyed hash (HMAC-SHA256) of "
                             "each user id instead of the id (default: ids as sent)")
    parser.add_argument("--request-log", choices=REQUEST_LOG_CHOICES, default=DEFAULTS.request_log,
                        help="which calls get a JSON line on stderr: all, errors (status not OK) or none; the "
                             "metrics count every call either way (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int,
                        help="serve Prometheus metrics over HTTP on this port (default: off)")
    parser.add_argument("--http-port", type=int,
                        help="also serve the service over HTTP/1.1 and JSON on this port (0 picks one): a route "
                             "per RPC, its OpenAPI document at /v1/openapi.json, a page to try it at / "
                             "(default: off)")
    return parser


def _url_host(host: str) -> str:
    """The listening host as a URL names it: "[::]" and "0.0.0.0" (every interface) as localhost."""
    return "localhost" if host in ("[::]", "::", "0.0.0.0", "") else host


# What `python -m recsys.server` needs beyond the client's install (the `serve` extra).
SERVE_MODULES = ("numpy", "prometheus_client", "grpc_reflection", "aiohttp", "tensorflow", "tensorflow_serving")


def missing_serve_modules() -> list[str]:
    return [name for name in SERVE_MODULES if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = missing_serve_modules()
    if missing:
        print(f"python -m recsys.server needs the 'serve' extra, which this environment lacks ({', '.join(missing)} "
              "not installed): pip install 'recsys[serve]'", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.stored_interactions < 0:
        parser.error("--stored-interactions must be 0 or more")
    if args.auth_jwt_audience and not args.auth_jwt_key:
        parser.error("--auth-jwt-audience needs --auth-jwt-key")
    if args.auth_jwt_key:
        from recsys.server.security import Authenticator

        try:
            Authenticator(jwt_key=args.auth_jwt_key.read_bytes())
        except (OSError, ValueError) as error:
            parser.error(f"--auth-jwt-key {args.auth_jwt_key}: not a readable PEM public key ({error})")
    if args.store_read_ms <= 0 or args.max_interactions_per_user < 1:
        parser.error("--store-read-ms must be above 0 and --max-interactions-per-user at least 1")
    if min(args.tensorflow_intra_op_parallelism, args.tensorflow_inter_op_parallelism) < 0:
        parser.error("--tensorflow-*-op-parallelism must be 0 (one thread per core) or more")
    from recsys.server.observability import ThreadedLogWriter

    logging.getLogger().setLevel(logging.INFO)
    log_writers = [ThreadedLogWriter(logging.getLogger(), "%(asctime)s %(levelname)s %(name)s %(message)s"),
                   # Request lines are JSON objects, one per line, for log shippers.
                   ThreadedLogWriter(logging.getLogger("recsys.requests"), "%(message)s")]
    logging.getLogger("recsys.requests").propagate = False

    from recsys.server.app import create_server
    from recsys.server.security import read_token
    from recsys.server.store import describe, open_store

    options = ServerOptions(
        host=args.host, port=args.port, grace_seconds=args.grace_seconds,
        tensorflow_intra_op_parallelism=args.tensorflow_intra_op_parallelism,
        tensorflow_inter_op_parallelism=args.tensorflow_inter_op_parallelism, max_workers=args.max_workers,
        poll_seconds=args.poll_seconds, max_concurrent_rpcs=args.max_concurrent_rpcs,
        max_queued_queries=args.max_queued_queries, backend_timeout_seconds=args.backend_timeout_seconds,
        max_request_bytes=args.max_request_bytes, max_batch_size=args.max_batch_size,
        max_connection_age_seconds=args.max_connection_age_seconds, max_connections=args.max_connections,
        send_stall_seconds=args.send_stall_seconds, interactions_db=args.interactions_db,
        stored_interactions=args.stored_interactions, reasons=args.reasons,
        store_read_seconds=args.store_read_ms / 1000, max_interactions_per_user=args.max_interactions_per_user,
        tls_cert=args.tls_cert.read_bytes() if args.tls_cert else None,
        tls_key=args.tls_key.read_bytes() if args.tls_key else None,
        auth_token=read_token(args.auth_token_file) if args.auth_token_file else None,
        auth_jwt_key=args.auth_jwt_key.read_bytes() if args.auth_jwt_key else None,
        auth_jwt_audience=args.auth_jwt_audience,
        log_user_id_key=read_token(args.log_user_id_key_file).encode() if args.log_user_id_key_file else None,
        request_log=args.request_log)
    start_tensorflow()  # both backends load TensorFlow (TF Serving's client its protos)
    if args.tf_serving:
        from recsys.server.tf_serving import TFServingBackend

        backend = TFServingBackend(args.tf_serving, args.models, args.retrieval_model, args.ranking_model,
                                   args.retrieval_signature, args.include_rated_signature, args.ranking_signature,
                                   args.model_version, args.similar_items_signature, args.explain_signature,
                                   args.rated_items_signature)
    else:
        from recsys.server.in_process import InProcessBackend, set_tensorflow_threads

        intra_op, inter_op = set_tensorflow_threads(options.tensorflow_intra_op_parallelism,
                                                    options.tensorflow_inter_op_parallelism)
        logging.getLogger("recsys.server").info("TensorFlow threads: intra-op %d, inter-op %d (0 = one per core)",
                                                intra_op, inter_op)
        backend = InProcessBackend(args.models, args.model_version, explains=options.reasons)
    log = logging.getLogger("recsys.server")
    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    try:
        store = open_store(options.interactions_db, options.max_interactions_per_user)
        log.info("interaction store: %s", describe(options.interactions_db))
        recommender, port = create_server(f"{options.host}:{options.port}", backend, args.models, options, store)
        recommender.metrics.log_lines_dropped.set_function(lambda: sum(writer.dropped for writer in log_writers))
        recommender.start()
        if args.metrics_port is not None:
            log.info("metrics on http://%s:%d/metrics", options.host, recommender.serve_metrics(args.metrics_port,
                                                                                              options.host))
        if args.http_port is not None:
            log.info("HTTP and JSON on http://%s:%d/ (OpenAPI: /v1/openapi.json)", _url_host(options.host),
                     recommender.serve_http(args.http_port, options.host))
    except (OSError, RuntimeError, sqlite3.Error) as error:  # e.g. the port is taken, the store's file unwritable
        log.error("could not start: %s", error)
        _stop_writers(log_writers, 5.0)
        return 1
    authenticated = bool(options.auth_token or options.auth_jwt_key)
    if authenticated and not options.tls_cert:
        log.warning("a bearer token is required but sent over plaintext, where anyone on the network can read it: "
                    "serve TLS (--tls-cert, --tls-key) or keep the port on a trusted network")
    log.info("listening on %s:%d (%s, models: %s%s)", options.host, port, "TLS" if options.tls_cert else "plaintext",
             args.models, ", bearer token required" if authenticated else "")
    stop_requested.wait()
    log.info("shutting down, grace %.1fs", options.grace_seconds)
    exit_by = time.monotonic() + options.grace_seconds + EXIT_SLACK_SECONDS
    stopped = recommender.stop(options.grace_seconds).wait(options.grace_seconds + EXIT_SLACK_SECONDS / 2)
    if not stopped or recommender.forced:
        log.error("shutdown forced: work was still running when the %.1f s grace ran out", options.grace_seconds)
        _stop_writers(log_writers, max(0.05, exit_by - time.monotonic()))
        os._exit(1)  # a thread still inside TensorFlow or a backend call would abort a normal exit
    _stop_writers(log_writers, max(0.05, exit_by - time.monotonic()))
    return 0


def _stop_writers(log_writers: list, timeout: float) -> None:
    """Write the lines still queued, within `timeout` seconds in all."""
    deadline = time.monotonic() + timeout
    for writer in log_writers:
        writer.stop(max(0.01, deadline - time.monotonic()))

if __name__ == "__main__":
    sys.exit(main())
