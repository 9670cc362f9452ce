"""The retrieval indexes: the best k movies for a query vector, from stock TensorFlow ops only.

Two interchangeable indexes with one contract, `index(queries, k, excluded) -> (scores, catalog
positions)`:
- `BruteForceIndex` scores every movie: exact, and the fastest on a small catalog;
- `PartitionedIndex`, an inverted-file (IVF) index: the movies are split into cells of balanced
  sizes by k-means at export; a query scores the cells' centroids, then only the movies of its
  best `probes` cells. Its cost grows with probes x cell size, not with the catalog.
ScaNN or FAISS would do the second, but their custom ops cannot load in a stock TF Serving.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.sparse as sparse
import tensorflow as tf
from sklearn.cluster import KMeans

# k-means fits its centroids on at most this many movies per cell (a sample of a large catalog),
# in this many passes.
KMEANS_SAMPLE_PER_CELL = 64
KMEANS_ITERATIONS = 12
# A cell holds at most this share more movies than the mean; every cell is padded to the largest.
CELL_SLACK = 0.1
# Each movie tries its this-many nearest centroids, nearest first, before taking any cell with room.
CELL_CHOICES = 8
CHUNK_ROWS = 16_384
# An index's recall is the share of the exact best RECALL_K it returns.
RECALL_K = 100
# The two indexes are timed on batches of this many queries (what the batcher gathers from 16
# concurrent calls, the benchmarks' load), over the tuning queries this many times.
TIMING_BATCH = 16
TIMING_ROUNDS = 2


class BruteForceIndex(tf.Module):
    """Catalog embeddings [movies, dim]; a query is one user embedding per row.

    Like TFRS's BruteForce, but with a documented interface of its own: excluded catalog
    positions (a user's history) get a score of -inf before the top-k, which costs one
    scatter of those positions rather than k + E comparisons per user.
    """

    kind = "brute_force"

    def __init__(self, item_embeddings: tf.Tensor | np.ndarray, name: str | None = None):
        super().__init__(name=name)
        self.item_embeddings = tf.Variable(item_embeddings, trainable=False, name="item_embeddings")

    def scores(self, queries: tf.Tensor) -> tf.Tensor:
        """Dot products [users, movies]."""
        return tf.matmul(queries, self.item_embeddings, transpose_b=True)

    def __call__(self, queries: tf.Tensor, k: int, excluded: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """The k best (scores, catalog positions) per user, best first. `excluded`: int64 [n, 2]
        (user row, catalog position) pairs scored -inf first, so never returned while k other
        movies remain; repeats are allowed."""
        scores = self.scores(queries)
        if excluded is not None:
            scores = tf.tensor_scatter_nd_update(scores, excluded, tf.fill([tf.shape(excluded)[0]], float("-inf")))
        return tf.math.top_k(scores, k=k)

    def exhaustive(self, queries: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]:
        """The exact k best, nothing excluded: the reference a partitioned index's recall is measured by."""
        return self(queries, k)


class Partition(NamedTuple):
    """Movies split into cells: `members` [cells, cell size] catalog positions, padded with the
    catalog's size (no movie); `centroids` [cells, dim]."""

    centroids: np.ndarray
    members: np.ndarray


def _nearest(points: np.ndarray, centroids: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Each point's `count` nearest centroids, nearest first, and their squared distances (up to the
    point's own norm, the same for all its centroids)."""
    centroid_norms = (centroids * centroids).sum(axis=1)
    nearest, distances = [], []
    for start in range(0, len(points), CHUNK_ROWS):
        distance = centroid_norms[None, :] - 2.0 * (points[start:start + CHUNK_ROWS] @ centroids.T)
        best = np.argpartition(distance, count - 1, axis=1)[:, :count] if count < distance.shape[1] else \
            np.tile(np.arange(distance.shape[1]), (len(distance), 1))
        best_distance = np.take_along_axis(distance, best, axis=1)
        order = np.argsort(best_distance, axis=1)
        nearest.append(np.take_along_axis(best, order, axis=1))
        distances.append(np.take_along_axis(best_distance, order, axis=1))
    return np.concatenate(nearest), np.concatenate(distances)


def kmeans(points: np.ndarray, cells: int, seed: int, iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """k-means centroids [cells, dim] (scikit-learn's, k-means++ seeded) fitted on a sample of at most
    KMEANS_SAMPLE_PER_CELL points per cell."""
    rng = np.random.default_rng(seed)
    sample = points[rng.choice(len(points), min(len(points), cells * KMEANS_SAMPLE_PER_CELL), replace=False)]
    fitted = KMeans(n_clusters=cells, n_init=1, max_iter=iterations, random_state=seed).fit(sample.astype(np.float32))
    return fitted.cluster_centers_.astype(np.float32)


def balanced_cells(points: np.ndarray, centroids: np.ndarray, capacity: int) -> np.ndarray:
    """Each point's cell, at most `capacity` points a cell: in rounds, every unplaced point asks for
    its next-nearest centroid and each cell takes the nearest askers it has room for; the few left
    after CELL_CHOICES rounds take the nearest cell with room."""
    cells = len(centroids)
    if capacity * cells < len(points):
        raise ValueError(f"{cells} cells of {capacity} cannot hold {len(points)} points")
    choices = min(CELL_CHOICES, cells)
    nearest, distances = _nearest(points, centroids, choices)
    cell_of = np.full(len(points), -1)
    room = np.full(cells, capacity)
    for choice in range(choices):
        pending = np.flatnonzero(cell_of < 0)
        if not pending.size:
            break
        wanted, distance = nearest[pending, choice], distances[pending, choice]
        order = np.lexsort((distance, wanted))
        wanted = wanted[order]
        rank = np.arange(len(order)) - np.searchsorted(wanted, wanted, side="left")
        taken = rank < room[wanted]
        cell_of[pending[order[taken]]] = wanted[taken]
        room -= np.bincount(wanted[taken], minlength=cells)
    centroid_norms = (centroids * centroids).sum(axis=1)
    for point in np.flatnonzero(cell_of < 0):
        distance = np.where(room > 0, centroid_norms - 2.0 * (centroids @ points[point]), np.inf)
        cell_of[point] = int(np.argmin(distance))
        room[cell_of[point]] -= 1
    return cell_of


def partition(points: np.ndarray, cells: int, seed: int = 0) -> Partition:
    """Split `points` [movies, dim] into `cells` k-means cells of balanced sizes."""
    if not 1 <= cells <= len(points):
        raise ValueError(f"cells must be between 1 and the catalog's size ({len(points)}); got {cells}")
    points = np.asarray(points, np.float32)
    centroids = kmeans(points, cells, seed)
    cell_of = balanced_cells(points, centroids, math.ceil(len(points) / cells * (1.0 + CELL_SLACK)))
    counts = np.bincount(cell_of, minlength=cells)
    members = np.full((cells, counts.max()), len(points), np.int64)
    order = np.argsort(cell_of, kind="stable")
    slots = np.arange(len(points)) - np.repeat(np.cumsum(counts) - counts, counts)
    members[cell_of[order], slots] = order
    # Each centroid is its cell's mean, as balanced: what a query is scored against.
    sums = np.asarray(sparse.csr_matrix((np.ones(len(points), np.float32), (cell_of, np.arange(len(points)))),
                                        shape=(cells, len(points))) @ points)
    return Partition((sums / np.maximum(counts, 1)[:, None]).astype(np.float32), members)


class PartitionedIndex(tf.Module):
    """An inverted-file index over catalog embeddings [movies, dim], with BruteForceIndex's contract.

    A query scores the `cells` centroids, keeps its `probes` best cells and scores their movies
    (probes x cell size of them); the top k of those is its answer, approximate where a movie of
    the exact top k sits in an unprobed cell (recall is measured at export, docs/performance.md).
    The movies are held by cell, [cells, cell size, dim], so a query's movies are one gather.
    """

    kind = "partitioned"

    def __init__(self, item_embeddings: tf.Tensor | np.ndarray, cells: int, probes: int, seed: int = 0,
                 name: str | None = None):
        super().__init__(name=name)
        embeddings = np.asarray(item_embeddings, np.float32)
        if not 1 <= probes <= cells:
            raise ValueError(f"probes must be between 1 and cells ({cells}); got {probes}")
        cell_partition = partition(embeddings, cells, seed)
        self.catalog_size = len(embeddings)
        self.cells, self.probes = cells, probes
        self.cell_size = cell_partition.members.shape[1]
        self.centroids = tf.Variable(cell_partition.centroids, trainable=False, name="centroids")
        padded = np.vstack([embeddings, np.zeros((1, embeddings.shape[1]), np.float32)])
        self.cell_embeddings = tf.Variable(padded[cell_partition.members], trainable=False, name="cell_embeddings")
        self.cell_members = tf.Variable(cell_partition.members.astype(np.int32), trainable=False, name="cell_members")
        # Each movie's slot in the cells flattened (cell x cell size + place in its cell): where an
        # excluded movie's score sits among a query's probed movies, if its cell is probed.
        members = cell_partition.members.ravel()
        held = members < len(embeddings)  # not padding
        slots = np.zeros(len(embeddings), np.int32)
        slots[members[held]] = np.flatnonzero(held)
        self.slot_of = tf.Variable(slots, trainable=False, name="slot_of")

    def probed(self, queries: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Scores and catalog positions [users, probes x cell size] of the movies in each query's best
        cells (padding slots score -inf), and those cells [users, probes]."""
        best_cells = tf.math.top_k(tf.matmul(queries, self.centroids, transpose_b=True), k=self.probes).indices
        scores = tf.einsum("ud,upsd->ups", queries, tf.gather(self.cell_embeddings, best_cells))
        positions = tf.cast(tf.gather(self.cell_members, best_cells), tf.int64)
        scores = tf.reshape(scores, [tf.shape(queries)[0], -1])
        positions = tf.reshape(positions, [tf.shape(queries)[0], -1])
        return tf.where(positions < self.catalog_size, scores, float("-inf")), positions, best_cells

    def _exclude(self, scores: tf.Tensor, best_cells: tf.Tensor, excluded: tf.Tensor) -> tf.Tensor:
        """`scores` [users, probes x cell size] with -inf at each `excluded` (user row, catalog position)
        whose cell that user probed: found by the movie's slot, so the cost is excluded movies x probes,
        not probed movies x log(excluded)."""
        slot = tf.gather(self.slot_of, excluded[:, 1])
        probed_here = tf.equal(tf.gather(best_cells, excluded[:, 0]), (slot // self.cell_size)[:, None])
        columns = tf.argmax(tf.cast(probed_here, tf.int32), axis=1, output_type=tf.int32) * self.cell_size \
            + slot % self.cell_size
        hits = tf.where(tf.reduce_any(probed_here, axis=1))[:, 0]
        indices = tf.stack([tf.gather(excluded[:, 0], hits), tf.cast(tf.gather(columns, hits), tf.int64)], axis=1)
        return tf.tensor_scatter_nd_update(scores, indices, tf.fill([tf.shape(indices)[0]], float("-inf")))

    def __call__(self, queries: tf.Tensor, k: int, excluded: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """The k best (scores, catalog positions) per user among the probed movies, best first.
        `excluded` as for BruteForceIndex. Where fewer than k probed movies remain, the last
        answers score -inf."""
        if k > self.probes * self.cell_size:
            raise ValueError(f"k={k} exceeds the {self.probes} x {self.cell_size} movies a query probes")
        scores, positions, best_cells = self.probed(queries)
        if excluded is not None:
            scores = self._exclude(scores, best_cells, excluded)
        top = tf.math.top_k(scores, k=k)
        # A padding slot only comes out scored -inf (which the service drops): it names movie 0.
        positions = tf.gather(positions, top.indices, batch_dims=1)
        return top.values, tf.where(positions < self.catalog_size, positions, tf.zeros_like(positions))

    def exhaustive(self, queries: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]:
        """The exact k best over every cell, nothing excluded."""
        scores = tf.reshape(tf.einsum("ud,csd->ucs", queries, self.cell_embeddings), [tf.shape(queries)[0], -1])
        positions = tf.cast(tf.reshape(self.cell_members, [-1]), tf.int64)
        top = tf.math.top_k(tf.where(positions[None, :] < self.catalog_size, scores, float("-inf")), k=k)
        return top.values, tf.gather(positions, top.indices)


@dataclass(frozen=True)
class IndexSpec:
    """Which index to build, as export/scale.py `choose_index` decided (and the metadata records)."""

    kind: str  # BruteForceIndex.kind or PartitionedIndex.kind
    cells: int = 0
    probes: int = 0
    reason: str = ""
    # A partitioned index takes the fewest probes (from the given ones up) whose recall@RECALL_K on the
    # queries it is built with reaches this (0: the probes stay as given).
    tune_to: float = 0.0
    # Above 0: once tuned, the partitioned index and brute force both answer the best `timed_k` for
    # the queries, TIMING_BATCH at a time, and the faster is built (0: the partitioned one stays). A
    # batch reads the catalog once by brute force but each query's cells once when partitioned, so
    # which is faster depends on the probes recall needs, the catalog and the machine: measured here,
    # on the machine that exports, not guessed from the catalog's size.
    timed_k: int = 0

    def build(self, item_embeddings: tf.Tensor | np.ndarray, queries: np.ndarray, k: int, seed: int = 0,
              name: str | None = None) -> tuple[BruteForceIndex | PartitionedIndex, dict]:
        """The index, and the metadata's record of it: what was built, why, and its recall@k on
        `queries` (a sample of what it will be asked) against brute force."""
        if self.kind != PartitionedIndex.kind:
            index = BruteForceIndex(item_embeddings, name=name)
            return index, {"kind": index.kind, "movies": int(index.item_embeddings.shape[0]), "reason": self.reason}
        index = PartitionedIndex(item_embeddings, self.cells, self.probes, seed, name=name)
        measured = _tune_probes(index, queries, k, self.tune_to) if self.tune_to else recall(index, queries, k)
        record = {"kind": index.kind, "movies": index.catalog_size, "reason": self.reason, "cells": index.cells,
                  "probes": index.probes, "cell_size": index.cell_size, "probed_movies": index.probes * index.cell_size,
                  "recall": round(measured, 4), "recall_at": k, "recall_queries": len(queries)}
        if not self.timed_k:
            return index, record
        brute_force = BruteForceIndex(item_embeddings, name=name)
        partitioned_ms, brute_force_ms = batch_milliseconds([index, brute_force], queries, self.timed_k)
        timing = {"timed_k": self.timed_k, "timed_batch": TIMING_BATCH,
                  "partitioned_ms": round(partitioned_ms, 3), "brute_force_ms": round(brute_force_ms, 3)}
        if partitioned_ms <= brute_force_ms:
            return index, record | timing
        reason = (f"{self.reason}; recall {measured:.3f} took {index.probes} probes ({record['probed_movies']:,} "
                  f"movies), {partitioned_ms:.2f} ms for {TIMING_BATCH} queries against brute force's "
                  f"{brute_force_ms:.2f}: every movie scored instead")
        return brute_force, {"kind": brute_force.kind, "movies": index.catalog_size, "reason": reason} | timing


def batch_milliseconds(indexes: list[BruteForceIndex | PartitionedIndex], queries: np.ndarray, k: int,
                       batch: int = TIMING_BATCH) -> list[float]:
    """Each index's median milliseconds to answer the best `k` for `batch` of `queries` at a time, traced
    as a serving graph calls it; the indexes take turns batch by batch, so that the machine's drift
    falls on all alike."""
    queries = np.asarray(queries, np.float32)
    calls = [tf.function(lambda rows, index=index: index(rows, k),
                         input_signature=[tf.TensorSpec([None, queries.shape[1]], tf.float32)]) for index in indexes]
    batches = [tf.constant(queries[start:start + batch]) for start in range(0, max(len(queries) - batch, 0) + 1, batch)]
    times: list[list[float]] = [[] for _ in indexes]
    for call in calls:
        call(batches[0])[0].numpy()  # traced here, not timed
    for _ in range(TIMING_ROUNDS):
        for rows in batches:
            for call, spent in zip(calls, times):
                started = time.perf_counter()
                call(rows)[0].numpy()
                spent.append((time.perf_counter() - started) * 1000)
    return [float(np.median(spent)) for spent in times]


def _tune_probes(index: PartitionedIndex, queries: np.ndarray, k: int, target: float) -> float:
    """Set `index.probes` to the fewest, from its own up, whose recall on `queries` reaches `target`
    (all cells if none do), and return that recall. Recall only grows with the probes (a movie of the
    exact top k that is probed is returned), so doubling then halving the gap finds the fewest."""
    exact = exact_top(index, queries, k)
    measured = {index.probes: recall(index, queries, k, exact)}

    def measure(probes: int) -> float:
        if probes not in measured:
            index.probes = probes
            measured[probes] = recall(index, queries, k, exact)
        return measured[probes]

    short, enough = index.probes - 1, index.probes
    while measure(enough) < target and enough < index.cells:
        short, enough = enough, min(index.cells, 2 * enough)
    while enough - short > 1:
        middle = (short + enough) // 2
        short, enough = (short, middle) if measure(middle) >= target else (middle, enough)
    index.probes = enough
    return measured[enough]


def exact_top(index: PartitionedIndex, queries: np.ndarray, k: int, chunk: int = 32) -> np.ndarray:
    """Each query's exact top k catalog positions [queries, k]."""
    return np.concatenate([index.exhaustive(tf.constant(queries[start:start + chunk], tf.float32), k)[1].numpy()
                           for start in range(0, len(queries), chunk)] or [np.zeros((0, k), np.int64)])


def recall(index: PartitionedIndex, queries: np.ndarray, k: int, exact: np.ndarray | None = None,
           chunk: int = 32) -> float:
    """Mean share of each query's exact top k (`exact_top`, computed here if not given) that the index returns."""
    exact = exact_top(index, queries, k, chunk) if exact is None else exact
    shares = []
    for start in range(0, len(queries), chunk):
        found = index(tf.constant(queries[start:start + chunk], tf.float32), k)[1].numpy()
        shares += [len(set(row) & set(reference)) / k for row, reference in zip(found, exact[start:start + chunk])]
    return float(np.mean(shares)) if shares else 1.0
