"""Measures what reading the ratings costs, streamed and in memory: time and peak memory per mode.

Each mode runs in its own process, so each peak RSS is that mode's alone. For data sets that
cannot be downloaded here, `synthetic_rows` writes a file in ML-25M's exact format (sorted by
user, as the real one is) to a temporary directory.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from recsys.export.data import DataSourceError

SYNTHETIC_MOVIES = 20_000
MODES = ("stream", "memory")
# In memory with an interaction store's ratings added, as `train --interactions-db` reads them.
STORE_MODE = "memory+store"


def write_synthetic_ml25m(directory: Path, rows: int, seed: int = 0) -> Path:
    """ratings.csv and movies.csv in ML-25M's format: ~150 ratings per user, Zipf-popular movies."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    users = np.sort(rng.integers(1, rows // 150 + 2, rows))
    movies = rng.zipf(1.3, rows) % SYNTHETIC_MOVIES + 1
    stars = rng.integers(1, 11, rows) / 2
    timestamps = rng.integers(1_000_000_000, 1_500_000_000, rows)
    with open(directory / "ratings.csv", "w") as out:
        out.write("userId,movieId,rating,timestamp\n")
        for start in range(0, rows, 1_000_000):
            chunk = slice(start, start + 1_000_000)
            out.write("".join(f"{user},{movie},{rating:g},{timestamp}\n" for user, movie, rating, timestamp in zip(
                users[chunk].tolist(), movies[chunk].tolist(), stars[chunk].tolist(), timestamps[chunk].tolist())))
    with open(directory / "movies.csv", "w") as out:
        out.write("movieId,title,genres\n")
        out.write("".join(f"{movie},Synthetic movie {movie} (2000),Drama\n" for movie in range(1, SYNTHETIC_MOVIES + 1)))
    return directory


def measure(mode: str, data_dir: str, dataset: str, batch_size: int, interactions_db: str | None = None) -> dict:
    """Prepare the fit rows and read one epoch of batches, the way training does."""
    from recsys.export.data import load_movielens
    from recsys.export.examples import from_stream
    from recsys.export.stored import stored_ratings
    from recsys.export.train import fit_in_memory

    started = time.perf_counter()
    data = load_movielens(data_dir, dataset, with_ratings=mode != "stream")
    if mode == "stream":
        fit = from_stream(data, "test")
    else:
        fit = fit_in_memory(data, "test", stored_ratings(interactions_db, data) if mode == STORE_MODE else None)
    prepared = time.perf_counter()
    rows = sum(int(batch["rating"].shape[0]) for batch in fit.batches(batch_size, 0))
    return {"mode": mode, "fit_rows": rows, "prepare_seconds": round(prepared - started, 1),
            "epoch_seconds": round(time.perf_counter() - prepared, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def run(data_dir: str | None, dataset: str, synthetic_rows: int, batch_size: int,
        interactions_db: str | None = None) -> list[dict]:
    """Each mode in a process of its own; with `interactions_db`, also the data with the store's ratings."""
    with tempfile.TemporaryDirectory(prefix="recsys-data-bench-") as scratch:
        if synthetic_rows:
            data_dir, dataset = str(write_synthetic_ml25m(Path(scratch) / "ml-25m", synthetic_rows)), "ml-25m"
        results = []
        for mode in MODES + ((STORE_MODE,) if interactions_db else ()):
            command = [sys.executable, "-m", "recsys.export", "data-bench", "--measure", mode, "--dataset", dataset,
                       "--batch-size", str(batch_size)] + (["--data-dir", data_dir] if data_dir else []) \
                + (["--interactions-db", interactions_db] if interactions_db else [])
            finished = subprocess.run(command, capture_output=True, text=True)
            if finished.returncode:
                raise DataSourceError(finished.stderr.strip().splitlines()[-1].removeprefix("error: "))
            results.append(json.loads(finished.stdout.strip().splitlines()[-1]))
    return results


def format_results(results: list[dict]) -> str:
    lines = [f"{'mode':12} {'fit rows':>10} {'prepare s':>10} {'epoch s':>8} {'peak RSS MB':>12}"]
    lines += [f"{r['mode']:12} {r['fit_rows']:>10} {r['prepare_seconds']:>10} {r['epoch_seconds']:>8} "
              f"{r['peak_rss_mb']:>12}" for r in results]
    return "\n".join(lines)
