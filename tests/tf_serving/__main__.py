"""python -m tests.tf_serving: the TF Serving stand-in as a process of its own, with the flags of
`tensorflow_model_server` that the tests use. Like the real server, it opens its port only after
the initial load, and a CHECK failure inside TensorFlow aborts the whole process."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from concurrent import futures

import grpc
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

from tests.tf_serving.model_server import ModelManager, ModelService, PredictionService


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.tf_serving", description=__doc__)
    parser.add_argument("--port", type=int, default=8500, help="gRPC port on 127.0.0.1; 0 picks a free one")
    parser.add_argument("--model_config_file", required=True, help="a ModelServerConfig in text format")
    parser.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                        help="how often the base paths are polled for new versions")
    parser.add_argument("--enable_model_warmup", type=lambda text: text.lower() != "false", default=True)
    parser.add_argument("--tensorflow_intra_op_parallelism", type=int, default=0)
    parser.add_argument("--tensorflow_inter_op_parallelism", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)

    manager = ModelManager(args.model_config_file, args.enable_model_warmup, args.tensorflow_intra_op_parallelism,
                           args.tensorflow_inter_op_parallelism)
    manager.poll()
    manager.wait_for_loads()  # server_core.cc: the port opens once the initial versions are loaded (or failed)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(manager), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(manager), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"Running gRPC ModelServer at 127.0.0.1:{port} ...", file=sys.stderr, flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    while not stopped.wait(args.file_system_poll_wait_seconds):
        manager.poll()
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
