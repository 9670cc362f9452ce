"""python -m recsys.export index-bench: brute force against the partitioned index, catalog size by
catalog size, on synthetic embeddings with planted structure.

Each catalog is CENTRES taste centres (random 64-dimension vectors) with every movie near one of them
(Gaussian noise of half their spread); each query is a user's taste, the sum of TASTES random centres
plus the same noise. Half the queries are the ones a partitioned index tunes its probes on, the
other half the ones its recall is measured on. `--unstructured` draws every movie on its own instead
(no taste centres; the same spread). Each index answers the top 200 (the default
candidate count) through a traced tf.function, one query at a time and 16 at a time, as the
serving graph calls it, with TensorFlow's thread pools sized as the server's.
Where the two cross sets `export/scale.py`'s PARTITIONED_MIN_MOVIES; above it an export times the two
on its own tuning queries (export/index.py IndexSpec.timed_k).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from recsys.export.index import RECALL_K, batch_milliseconds, recall
from recsys.export.presets import PRESETS
from recsys.export.scale import choose_index
from recsys.server.options import DEFAULTS

CENTRES = 1_682
DIM = 64
TASTES = 3
CANDIDATES = 200
QUERIES = 200
# Queries timed one at a time (each answered TIMING_ROUNDS times).
ONE_QUERY_CALLS = 25


@dataclass(frozen=True)
class Timing:
    movies: int
    kind: str
    build_seconds: float
    one_query_ms: float  # median of calls with 1 query
    sixteen_queries_ms: float  # median of calls with 16
    recall: float
    detail: str


def planted_catalog(movies: int, seed: int = 0, structured: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings [movies, DIM] and queries [QUERIES, DIM]; unstructured, every movie is drawn on its
    own (the worst case for any index that skips movies)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CENTRES, DIM)).astype(np.float32)
    near = centres[rng.integers(0, CENTRES, movies)] if structured else rng.normal(size=(movies, DIM)) * 1.1
    embeddings = near + 0.5 * rng.normal(size=(movies, DIM)).astype(np.float32)
    tastes = centres[rng.integers(0, CENTRES, (QUERIES, TASTES))].sum(axis=1)
    return embeddings.astype(np.float32), (tastes + 0.5 * rng.normal(size=(QUERIES, DIM))).astype(np.float32)


def measure(movies: int, kind: str, structured: bool = True) -> Timing:
    embeddings, queries = planted_catalog(movies, structured=structured)
    preset = PRESETS["default"].with_overrides([f"retrieval_index={kind}"])
    spec = choose_index(preset, movies, CANDIDATES)
    started = time.perf_counter()
    tuning, held_out = queries[:QUERIES // 2], queries[QUERIES // 2:]
    index, _ = spec.build(embeddings, tuning, RECALL_K)
    build_seconds = time.perf_counter() - started
    detail = f"{index.probes} of {index.cells} cells, {index.probes * index.cell_size:,} movies scored" \
        if spec.kind == "partitioned" else "every movie scored"
    # Timed as an export times the two (export/index.py batch_milliseconds): medians over batches.
    one_query_ms, = batch_milliseconds([index], queries[:ONE_QUERY_CALLS], CANDIDATES, batch=1)
    sixteen_queries_ms, = batch_milliseconds([index], queries, CANDIDATES, batch=16)
    return Timing(movies, spec.kind, build_seconds, one_query_ms, sixteen_queries_ms,
                  recall(index, held_out, RECALL_K) if spec.kind == "partitioned" else 1.0, detail)


def run(sizes: list[int], structured: bool = True) -> list[Timing]:
    """Both indexes at each size, TensorFlow's thread pools sized as the server's."""
    from recsys.server.in_process import set_tensorflow_threads

    set_tensorflow_threads(DEFAULTS.tensorflow_intra_op_parallelism, DEFAULTS.tensorflow_inter_op_parallelism)
    return [measure(movies, kind, structured=structured) for movies in sizes for kind in ("brute_force", "partitioned")]


def format_results(timings: list[Timing]) -> str:
    lines = ["| movies | index | 1 query ms | 16 queries ms | recall@100 | build s | |", "|---:|---|---:|---:|---:|---:|---|"]
    lines += [f"| {t.movies:,} | {t.kind} | {t.one_query_ms:.2f} | {t.sixteen_queries_ms:.2f} | {t.recall:.4f} | "
              f"{t.build_seconds:.1f} | {t.detail} |" for t in timings]
    return "\n".join(lines)
