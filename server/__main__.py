"""python -m server: serve recommendations over gRPC from exported models."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

import server  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    parser.add_argument("--models", required=True, type=Path,
                        help="models directory written by 'python -m export train' (SavedModels and item metadata)")
    parser.add_argument("--host", default="[::]", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=50051, help="port to listen on; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--model-version", type=int,
                        help="serve this version instead of the newest (with --tf-serving: pin it in every request)")
    tf_serving = parser.add_argument_group("TF Serving backend (instead of loading the models in-process)")
    tf_serving.add_argument("--tf-serving", metavar="HOST:PORT",
                            help="call both stages through this TF Serving's gRPC PredictionService; item metadata "
                                 "still comes from --models")
    tf_serving.add_argument("--retrieval-model", default="retrieval", help="TF Serving model name (default: %(default)s)")
    tf_serving.add_argument("--ranking-model", default="ranking", help="TF Serving model name (default: %(default)s)")
    tf_serving.add_argument("--retrieval-signature", default="serving_default",
                            help="signature that excludes rated movies (default: %(default)s)")
    tf_serving.add_argument("--include-rated-signature", default="include_rated",
                            help="retrieval signature used when a request sets include_rated (default: %(default)s)")
    tf_serving.add_argument("--ranking-signature", default="serving_default", help="(default: %(default)s)")
    parser.add_argument("--poll-seconds", type=float, default=5.0,
                        help="how often to look for a new model version / probe the backend (default: %(default)s)")
    parser.add_argument("--grace-seconds", type=float, default=10.0,
                        help="on SIGTERM/SIGINT, how long in-flight calls may finish (default: %(default)s)")
    parser.add_argument("--max-workers", type=int, default=16, help="RPC worker threads (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    from server.app import create_server

    if args.tf_serving:
        from server.tf_serving import TFServingBackend

        backend = TFServingBackend(args.tf_serving, args.retrieval_model, args.ranking_model, args.retrieval_signature,
                                   args.include_rated_signature, args.ranking_signature, args.model_version)
    else:
        from server.backend import InProcessBackend

        backend = InProcessBackend(args.models, args.model_version)
    recommender, port = create_server(f"{args.host}:{args.port}", backend, args.models,
                                      max_workers=args.max_workers, poll_seconds=args.poll_seconds)
    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    recommender.start()
    logging.getLogger("recsys.server").info("listening on %s:%d (models: %s)", args.host, port, args.models)
    stop_requested.wait()
    logging.getLogger("recsys.server").info("shutting down, grace %.1fs", args.grace_seconds)
    recommender.stop(args.grace_seconds).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
