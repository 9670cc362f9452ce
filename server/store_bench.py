"""python -m recsys.server.store_bench: what a Recommend's store read costs with millions of stored rows.

Loads a store (an SQLite file or a PostgreSQL URL; it must be empty) with synthetic interactions
quickly, then times the read Recommend makes (each user's newest N, and the erasure check) for
random users, from several threads at once, against the same read on an empty store of the
same kind measured first in the same run. Rows per user follow a long tail (as in MovieLens),
each user at most the store's per-user cap.

Loading bypasses RecordInteractions: one transaction per 100,000 rows for SQLite, COPY for
PostgreSQL, with the store's own schema and indexes.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import numpy as np

from recsys.server.options import DEFAULTS
from recsys.server.store import READ_THREADS, InteractionStore, open_store

LOAD_BATCH_ROWS = 100_000
COLUMNS = "user_id, item_id, rating, rated_at, timestamp_seconds"


def rows_per_user(users: int, rows: int, cap: int, seed: int) -> np.ndarray:
    """A long-tailed count per user (lognormal), each at least 1 and at most `cap`, summing to about `rows`."""
    draws = np.random.default_rng(seed).lognormal(0.0, 1.0, users)
    counts = np.clip(np.round(draws / draws.sum() * rows), 1, cap).astype(np.int64)
    return counts


def _batches(counts: np.ndarray, items: int, seed: int, movielens_ids: bool = False):
    """Rows (user, movie, stars, rated_at, time) in batches of about LOAD_BATCH_ROWS; movie n is named
    "movie-n", or with `movielens_ids` "n + 1"."""
    rng = np.random.default_rng(seed + 1)
    batch: list[tuple] = []
    for user, count in enumerate(counts.tolist()):
        movies = rng.choice(items, size=count, replace=False) if count < items else np.arange(items)
        times = 1_600_000_000 + rng.integers(0, 100_000_000, size=count)
        stars = rng.integers(1, 11, size=count) / 2
        user_id = f"user-{user}"
        batch.extend((user_id, str(movie + 1) if movielens_ids else f"movie-{movie}", float(star), int(when), int(when))
                     for movie, star, when in zip(movies.tolist(), stars.tolist(), times.tolist()))
        if len(batch) >= LOAD_BATCH_ROWS:
            yield batch
            batch = []
    if batch:
        yield batch


def load(store: InteractionStore, counts: np.ndarray, items: int, seed: int, movielens_ids: bool = False) -> float:
    """Insert the rows; returns the seconds it took. `movielens_ids`: movies named "1" to `items`, as
    MovieLens names its movies, so that the rows join a MovieLens catalog's training."""
    started = time.perf_counter()
    total, loaded = int(counts.sum()), 0
    connection = store._connect()
    try:
        for batch in _batches(counts, items, seed, movielens_ids):
            if store.kind == "postgresql":
                with connection.cursor() as cursor, cursor.copy(f"COPY interactions ({COLUMNS}) FROM STDIN") as copy:
                    for row in batch:
                        copy.write_row(row)
            else:
                connection.executemany(f"INSERT INTO interactions ({COLUMNS}) VALUES (?, ?, ?, ?, ?)", batch)
            connection.commit()
            loaded += len(batch)
            print(f"  loaded {loaded:,} of {total:,} rows, {time.perf_counter() - started:.0f}s", file=sys.stderr)
    finally:
        connection.close()
    return time.perf_counter() - started


def time_reads(store: InteractionStore, user_count: int, limit: int, threads: int, reads: int,
               batch_users: int) -> list[float]:
    """Milliseconds of each `records` call (newest `limit` rows of `batch_users` random users), from
    `threads` threads at once."""
    latencies: list[float] = []
    lock = threading.Lock()

    def run(seed: int) -> None:
        rng = np.random.default_rng(seed)
        mine = []
        for _ in range(reads // threads):
            users = [f"user-{n}" for n in rng.integers(0, user_count, size=batch_users)]
            begun = time.perf_counter()
            store.records(users, limit)
            mine.append((time.perf_counter() - begun) * 1000)
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return latencies


def _summary(name: str, latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"{name:<28} p50 {statistics.median(ordered):7.2f} ms   p99 {p99:7.2f} ms   ({len(ordered):,} reads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recsys.server.store_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="an empty store: an SQLite file's path or a postgresql:// URL")
    parser.add_argument("--empty-store", help="a second empty store of the same kind (the baseline); "
                                              "required unless --load-only")
    parser.add_argument("--users", type=int, default=160_000, help="(default: %(default)s)")
    parser.add_argument("--rows", type=int, default=25_000_000, help="about this many rows (default: %(default)s)")
    parser.add_argument("--items", type=int, default=60_000, help="distinct movie ids (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=DEFAULTS.stored_interactions,
                        help="newest rows read per user, as --stored-interactions (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=READ_THREADS,
                        help="concurrent readers, as the server's store read threads (default: %(default)s)")
    parser.add_argument("--reads", type=int, default=4_000, help="reads per measurement (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load-only", action="store_true",
                        help="load the store and stop (a store at size for 'python -m recsys.export data-bench "
                             "--interactions-db' or 'train --interactions-db')")
    parser.add_argument("--movielens-ids", action="store_true",
                        help="name the movies 1 to --items as MovieLens does (default: movie-0 onwards)")
    args = parser.parse_args(argv)
    if not args.load_only and not args.empty_store:
        parser.error("--empty-store is required unless --load-only")
    store = open_store(args.store)
    # A user rates each movie once, and the store keeps at most its per-user cap.
    counts = rows_per_user(args.users, args.rows, min(store.max_per_user, args.items), args.seed)
    seconds = load(store, counts, args.items, args.seed, args.movielens_ids)
    print(f"{store.kind}: {int(counts.sum()):,} rows of {args.users:,} users (at most {int(counts.max()):,} a user) "
          f"loaded in {seconds:.0f} s")
    if args.load_only:
        store.close()
        return 0
    empty = open_store(args.empty_store)
    for batch_users in (1, 32):
        for name, measured in (("empty", empty), ("full", store)):
            latencies = time_reads(measured, args.users, args.limit, args.threads, args.reads, batch_users)
            print(_summary(f"{name}, {batch_users} user(s) a read", latencies))
    store.close()
    empty.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
