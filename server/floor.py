"""python -m recsys.server.floor: the Recommender contract answered from memory, no models, for benchmarks.

It streams k canned RankedItems per Recommend call, so `python -m recsys.client bench` against it
measures what gRPC in Python costs on this machine: the floor under the real server's
latency and the ceiling over its throughput. `--aio` serves with grpc.aio, as the real
server does; without it, a thread-pool server, for comparison.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from concurrent import futures

import grpc

from recsys.server.limits import DEFAULT_K, MAX_K
from recsys.v1 import recommender_pb2, recommender_pb2_grpc

CANNED = [recommender_pb2.RankedItem(rank=n + 1, item_id=str(n + 1), title=f"Canned movie {n + 1} (1995)",
                                     genres=["Drama"], score=1.0, retrieval_score=1.0, predicted_rating=4.0,
                                     model_version="0") for n in range(MAX_K)]


class ThreadPoolFloor(recommender_pb2_grpc.RecommenderServicer):
    def Recommend(self, request, context):
        yield from CANNED[:request.k or DEFAULT_K]


class AioFloor(recommender_pb2_grpc.RecommenderServicer):
    async def Recommend(self, request, context):
        for item in CANNED[:request.k or DEFAULT_K]:
            yield item


def serve_thread_pool(address: str, max_workers: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    recommender_pb2_grpc.add_RecommenderServicer_to_server(ThreadPoolFloor(), server)
    port = server.add_insecure_port(address)
    server.start()
    print(f"floor (thread pool) listening on port {port}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: server.stop(0))
    server.wait_for_termination()


async def serve_aio(address: str) -> None:
    server = grpc.aio.server()
    recommender_pb2_grpc.add_RecommenderServicer_to_server(AioFloor(), server)
    port = server.add_insecure_port(address)
    await server.start()
    print(f"floor (grpc.aio) listening on port {port}", file=sys.stderr, flush=True)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(server.stop(0)))
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys.server.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=50052, help="port; 0 picks a free one (default: %(default)s)")
    parser.add_argument("--aio", action="store_true", help="serve with grpc.aio instead of a thread pool")
    parser.add_argument("--max-workers", type=int, default=16, help="thread-pool size (default: %(default)s)")
    args = parser.parse_args(argv)
    address = f"{args.host}:{args.port}"
    try:
        if args.aio:
            asyncio.run(serve_aio(address))
        else:
            serve_thread_pool(address, args.max_workers)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
