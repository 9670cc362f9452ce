"""python -m recsys.client: call a running recommender."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from recsys.client.api import DEFAULT_TIMEOUT_SECONDS, RecommenderClient


def _clipped(text: str, width: int) -> str:
    """`text` in `width` columns, cut with an ellipsis when longer."""
    return f"{text if len(text) <= width else text[:width - 1] + '…':<{width}}"


def format_items(items) -> str:
    """A table; the rating column is blank where no rating is predicted (SimilarItems without a user,
    popularity fallback), and reasons name the movies of the user's history they come from."""
    lines = [f"{'rank':>4}  {'title':<50} {'genres':<32} {'score':>8} {'rating':>6}"]
    for item in items:
        marker = " (fallback)" if item.fallback else ""
        rating = f"{item.predicted_rating:>6.2f}" if item.predicted_rating else f"{'':>6}"
        lines.append(f"{item.rank:>4}  {_clipped(item.title, 50)} {_clipped(', '.join(item.genres), 32)} "
                     f"{item.score:>8.3f} {rating}{marker}".rstrip())
        if item.because_titles:
            lines.append(f"{'':>6}because you watched {'; '.join(item.because_titles)}")
    return "\n".join(lines)


def parse_interaction(text: str) -> tuple[str, float]:
    """ITEM or ITEM:STARS -> (movie id, stars); no stars means no rating (0). Anything else (an empty
    id, stars that are not a number from 0.5 to 5, more than one ':') is a usage error."""
    item_id, separator, stars = text.rpartition(":") if ":" in text else (text, "", "")
    problem = f"expected ITEM[:STARS] with STARS from 0.5 to 5, e.g. 50:4.5; got {text!r}"
    if not item_id or ":" in item_id:
        raise argparse.ArgumentTypeError(problem)
    try:
        rating = float(stars) if separator else 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(problem) from None
    if separator and not 0.5 <= rating <= 5.0:
        raise argparse.ArgumentTypeError(problem)
    return item_id, rating


def list_length(text: str) -> int:
    """-k: a whole number from 1 to the server's maximum (100)."""
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 100; got {text!r}") from None
    if not 1 <= k <= 100:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to 100; got {k}")
    return k


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca", type=Path, help="PEM CA certificate to verify the server with; enables TLS")
    parser.add_argument("--token-file", type=Path, help="file holding the bearer token the server requires")


def connect(args: argparse.Namespace) -> RecommenderClient:
    return RecommenderClient(args.target, timeout=args.timeout,
                             ca_cert=args.ca.read_bytes() if args.ca else None,
                             token=args.token_file.read_text().strip() if args.token_file else None)


def wait_until_serving(client: RecommenderClient, seconds: float) -> bool:
    """--wait: False (reported on stderr) if the server was not SERVING in time."""
    try:
        client.wait_until_serving(seconds)
    except TimeoutError as error:
        print(f"error: {error}", file=sys.stderr)
        return False
    return True


def run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from recsys.client import bench

    known_users = known_items = None
    if args.models:
        metadata = newest_metadata(args.models)
        known_users = sorted(metadata["user_ids"], key=lambda user: (len(user), user))
        known_items = sorted(metadata["items"], key=lambda item: (len(item), item))
    user_ids = bench.user_mix(args.users, known_users)
    interactions = bench.interaction_mix(max(args.interactions, int(args.record)), known_items)
    try:
        sampler = bench.ServerSampler(args.server_pid, args.rss_every) if args.server_pid else None
    except ValueError as error:
        parser.error(str(error))
    if args.wait:
        with RecommenderClient(args.target) as client:
            if not wait_until_serving(client, args.wait):
                return 1
    with sampler or contextlib.nullcontext():
        tally, wall = bench.run_against_server(args.target, args.concurrency, args.duration, args.k, user_ids,
                                               args.processes, args.timeout, interactions, args.record)
    summary = bench.summarize(tally, wall, args.target, args.concurrency, args.k)
    if sampler:
        bench.add_server_figures(summary, sampler)
    print(bench.format_summary(summary))
    if args.json:
        bench.write_json(summary, args.json)
    failed = sum(tally.errors.values())
    if failed:  # a benchmark whose requests failed measured the failures, not the service
        print(f"error: {failed:,} of {failed + len(tally.latencies_ms):,} requests failed: "
              + ", ".join(f"{code} {count:,}" for code, count in tally.errors.most_common()), file=sys.stderr)
        return 1
    return 0


def newest_metadata(models_dir: Path) -> dict:
    """The newest export's metadata: its known users and movies, so the mix matches the data set."""
    metadata_files = sorted((models_dir / "metadata").glob("*.json"), key=lambda p: int(p.stem))
    if not metadata_files:
        raise SystemExit(f"no metadata in {models_dir}")
    return json.loads(metadata_files[-1].read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys.client", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    recommend = commands.add_parser("recommend", help="print one user's ranked recommendations")
    recommend.add_argument("--target", default="localhost:50051", help="server HOST:PORT (default: %(default)s)")
    recommend.add_argument("--user", required=True, help="user id, e.g. 42")
    recommend.add_argument("-k", type=list_length, default=10, help="how many items, 1 to 100 (default: %(default)s)")
    recommend.add_argument("--exclude", nargs="*", default=[], metavar="ITEM_ID", help="movie ids never to return")
    recommend.add_argument("--include-rated", action="store_true",
                           help="allow movies the user already rated or sent with --interaction")
    recommend.add_argument("--interaction", action="append", default=[], type=parse_interaction, metavar="ITEM[:STARS]",
                           dest="interactions",
                           help="something the user just did with a movie: rated it STARS (0.5 to 5) or, without "
                                "STARS, watched it; repeatable. Both models use these with the user's history, and "
                                "a user id the models do not know is served from them alone")
    recommend.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS,
                           help="deadline in seconds (default: %(default)s)")
    recommend.add_argument("--wait", type=float, default=0.0,
                           help="first wait up to this many seconds for the server to be SERVING")
    recommend.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_connection_arguments(recommend)

    similar = commands.add_parser("similar", help="print the movies most like one movie (\"more like this\")")
    similar.add_argument("--item", required=True, help="movie id, e.g. 1 (Toy Story)")
    similar.add_argument("--user", default="", help="also leave out this user's history and order for them")
    similar.add_argument("-k", type=list_length, default=10, help="how many movies, 1 to 100 (default: %(default)s)")
    similar.add_argument("--exclude", nargs="*", default=[], metavar="ITEM_ID", help="movie ids never to return")
    similar.add_argument("--json", action="store_true", help="print JSON instead of a table")

    record = commands.add_parser("record", help="record what a user did, for their later lists and the next "
                                                "training run (needs a server with an interaction store)")
    record.add_argument("--user", required=True, help="user id (any, known to the models or not)")
    record.add_argument("--interaction", action="append", required=True, type=parse_interaction,
                        metavar="ITEM[:STARS]", dest="interactions",
                        help="a movie the user rated STARS (0.5 to 5) or, without STARS, watched; repeatable")
    forget = commands.add_parser("forget", help="erase a user's recorded interactions")
    forget.add_argument("--user", required=True, help="user id")
    for command in (similar, record, forget):
        command.add_argument("--target", default="localhost:50051", help="server HOST:PORT (default: %(default)s)")
        command.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS,
                             help="deadline in seconds (default: %(default)s)")
        add_connection_arguments(command)

    bench = commands.add_parser("bench", help="load-test Recommend and print throughput and latency percentiles")
    bench.add_argument("--target", default="localhost:50051", help="server HOST:PORT (default: %(default)s)")
    bench.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: %(default)s)")
    bench.add_argument("--duration", type=float, default=10.0, help="seconds to run (default: %(default)s)")
    bench.add_argument("-k", "--k", type=int, default=10, help="items per request (default: %(default)s)")
    bench.add_argument("--users", default="all",
                       help="'all' or N: draw user ids from the first N MovieLens users; ~3%% are unknown ids "
                            "(cold start) (default: %(default)s)")
    bench.add_argument("--processes", type=int, default=1,
                       help="load generator processes, each with its own grpc.aio loop (default: %(default)s)")
    bench.add_argument("--timeout", type=float, default=5.0, help="per-request deadline (default: %(default)s)")
    bench.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                       help="first wait up to this many seconds for the server's health to say SERVING (models "
                            "loaded), so the run measures a ready server (default: no wait)")
    bench.add_argument("--models", type=Path,
                       help="models directory the server serves: draw known user ids from its newest metadata "
                            "(default: MovieLens ids 1..943)")
    bench.add_argument("--interactions", type=int, default=0, metavar="N",
                       help="send N recent interactions (distinct movies, 1 to 5 stars) with every request, as a "
                            "client that passes what its user just did (default: %(default)s)")
    bench.add_argument("--record", action="store_true",
                       help="load RecordInteractions instead of Recommend: each call records the --interactions "
                            "(at least 1) for a user of the mix")
    bench.add_argument("--json", type=Path, help="also write the figures as JSON to this path")
    bench.add_argument("--server-pid", type=int, metavar="PID",
                       help="also report this server process's CPU use (percent of one core, ms per request) "
                            "and resident memory (start, end, max) over the run (Linux /proc): CPU per request "
                            "bounds what the machine can serve, memory growth over a long run is how a leak shows")
    bench.add_argument("--rss-every", type=float, default=10.0, metavar="SECONDS",
                       help="with --server-pid: seconds between samples (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return run_bench(args, parser)

    with connect(args) as client:
        try:
            if args.command == "record":
                print(f"recorded {client.record_interactions(args.user, args.interactions)} movies for user {args.user}")
                return 0
            if args.command == "forget":
                print(f"forgot {client.forget_user(args.user)} interactions of user {args.user}")
                return 0
            if args.command == "similar":
                items = client.similar(args.item, k=args.k, exclude=args.exclude, user_id=args.user)
                heading = f"like {items.item_title or 'movie ' + args.item}" + (
                    f", for user {args.user}" if args.user else "")
            else:
                if args.wait and not wait_until_serving(client, args.wait):
                    return 1
                items = client.recommend(args.user, k=args.k, exclude=args.exclude, include_rated=args.include_rated,
                                         interactions=args.interactions)
                heading = f"user {args.user}"
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps([json_format.MessageToDict(item, preserving_proto_field_name=True) for item in items], indent=2))
    else:
        print(f"{heading}, model version {items[0].model_version if items else '?'}")
        print(format_items(items))
    unknown = getattr(items, "unknown_interactions", 0)
    if unknown:
        print(f"note: {unknown} of the interactions used name movies the served models do not know; they were "
              "ignored", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
