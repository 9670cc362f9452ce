"""python -m client: call a running recommender."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from client.api import DEFAULT_TIMEOUT_SECONDS, RecommenderClient


def format_items(items) -> str:
    lines = [f"{'rank':>4}  {'title':<50} {'genres':<32} {'score':>8} {'rating':>6}"]
    for item in items:
        marker = " (fallback)" if item.fallback else ""
        lines.append(f"{item.rank:>4}  {item.title[:50]:<50} {', '.join(item.genres)[:32]:<32} "
                     f"{item.score:>8.3f} {item.predicted_rating:>6.2f}{marker}")
    return "\n".join(lines)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca", type=Path, help="PEM CA certificate to verify the server with; enables TLS")
    parser.add_argument("--token-file", type=Path, help="file holding the bearer token the server requires")


def connect(args: argparse.Namespace) -> RecommenderClient:
    return RecommenderClient(args.target, timeout=args.timeout,
                             ca_cert=args.ca.read_bytes() if args.ca else None,
                             token=args.token_file.read_text().strip() if args.token_file else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    recommend = commands.add_parser("recommend", help="print one user's ranked recommendations")
    recommend.add_argument("--target", default="localhost:50051", help="server HOST:PORT (default: %(default)s)")
    recommend.add_argument("--user", required=True, help="user id, e.g. 42")
    recommend.add_argument("-k", type=int, default=10, help="how many items (default: %(default)s; server maximum 100)")
    recommend.add_argument("--exclude", nargs="*", default=[], metavar="ITEM_ID", help="movie ids never to return")
    recommend.add_argument("--include-rated", action="store_true", help="allow movies the user already rated")
    recommend.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS,
                           help="deadline in seconds (default: %(default)s)")
    recommend.add_argument("--wait", type=float, default=0.0,
                           help="first wait up to this many seconds for the server to be SERVING")
    recommend.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_connection_arguments(recommend)
    args = parser.parse_args(argv)

    with connect(args) as client:
        try:
            if args.wait:
                client.wait_until_serving(args.wait)
            items = client.recommend(args.user, k=args.k, exclude=args.exclude, include_rated=args.include_rated)
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        except TimeoutError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps([json_format.MessageToDict(item, preserving_proto_field_name=True) for item in items], indent=2))
    else:
        version = items[0].model_version if items else "?"
        print(f"user {args.user}, model version {version}")
        print(format_items(items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
