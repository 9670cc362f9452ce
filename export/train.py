"""Train both stages on the train split and write them as one export version."""
from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import tensorflow as tf

from recsys.export.data import DEFAULT_SHUFFLE_BUFFER, MovieLens, fit_and_held_out, popularity_order
from recsys.export.examples import FitData, from_rows, from_stream
from recsys.export.item_item import co_rating_factors, ease_weights, history_matrix
from recsys.export.models import RankingModel, RetrievalModel, item_towers_by_member, make_optimizer
from recsys.export.presets import STRATEGIES, Preset
from recsys.export.progress import Progress
from recsys.export.savedmodel import write_export
from recsys.export.scale import choose_index, fit_to_data
from recsys.export.serving import (
    SIMILAR_CANDIDATES,
    ItemItem,
    RankingServing,
    RetrievalServing,
    ServedHistory,
    ServedUserTower,
    TowerParts,
)
from recsys.export.stored import StoredRatings


class EpochProgress(tf.keras.callbacks.Callback):
    """Keras training with a `Progress` per epoch (steps) and one summary line per epoch."""

    def __init__(self, stage: str, epochs: int, steps_per_epoch: int, stream: IO[str] | None = None):
        super().__init__()
        self._supports_tf_logs = True  # per-step hooks without copying each step's logs to numpy
        self.stage, self.epochs, self.steps = stage, epochs, steps_per_epoch
        self.stream = stream or sys.stdout
        self.started = time.perf_counter()
        self.progress: Progress | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.progress = Progress(f"[{self.stage}] epoch {epoch + 1}/{self.epochs}", self.steps, "steps", self.stream)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.progress is not None:
            self.progress.advance()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.progress is not None:
            self.progress.close()
        metrics = " ".join(f"{key}={value:.4f}" for key, value in (logs or {}).items()
                           if key in ("loss", "total_loss", "rmse", "root_mean_squared_error"))
        print(f"  [{self.stage}] epoch {epoch + 1}/{self.epochs} {metrics} "
              f"({time.perf_counter() - self.started:.1f}s)", file=self.stream, flush=True)


def make_strategy(name: str) -> tf.distribute.Strategy:
    """default: this process's devices as they are; mirrored: all local devices;
    multi-worker: MultiWorkerMirroredStrategy with the cluster from the standard TF_CONFIG."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {name!r}")
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi-worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Only the chief writes the export (worker 0 when TF_CONFIG names no chief)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                             and "chief" not in resolver.cluster_spec().as_dict())


def steps_per_epoch(fit: FitData, batch_size: int, preset: Preset) -> int:
    """A pass over the fit rows, or the preset's `steps_per_epoch` where that is fewer."""
    passing = math.ceil(fit.row_count / batch_size)
    return min(passing, preset.steps_per_epoch) if preset.steps_per_epoch else passing


def train_retrieval(fit: FitData, item_ids: list[str], preset: Preset,
                    strategy: tf.distribute.Strategy | None = None) -> RetrievalModel:
    with (strategy or tf.distribute.get_strategy()).scope():
        model = RetrievalModel(fit.user_ids, item_ids, fit.rated_item_ids, preset, fit.rating_counts)
        model.compile(optimizer=make_optimizer(preset.retrieval_optimizer, preset.retrieval_learning_rate))
    steps = steps_per_epoch(fit, preset.retrieval_batch_size, preset)
    model.fit(fit.batches(preset.retrieval_batch_size, preset.seed), epochs=preset.retrieval_epochs,
              steps_per_epoch=steps if preset.steps_per_epoch else None, verbose=0,
              callbacks=[EpochProgress("retrieval", preset.retrieval_epochs, steps)])
    return model


def train_ranking(fit: FitData, item_ids: list[str], preset: Preset,
                  strategy: tf.distribute.Strategy | None = None) -> RankingModel:
    with (strategy or tf.distribute.get_strategy()).scope():
        model = RankingModel(fit.user_ids, item_ids, preset, fit.rated_item_ids, fit.rated_stars, fit.rating_counts)
        steps = steps_per_epoch(fit, preset.ranking_batch_size, preset)
        decay_steps = preset.ranking_epochs * steps
        model.compile(optimizer=make_optimizer(preset.ranking_optimizer, preset.ranking_learning_rate,
                                               decay_steps if preset.ranking_cosine_decay else 0))
    model.fit(fit.batches(preset.ranking_batch_size, preset.seed + 1), epochs=preset.ranking_epochs,
              steps_per_epoch=steps if preset.steps_per_epoch else None, verbose=0,
              callbacks=[EpochProgress("ranking", preset.ranking_epochs, steps)])
    return model


def build_metadata(data: MovieLens, fit: FitData, preset: Preset) -> dict:
    """What the server needs beside the graphs: display data, popularity, which users the models know.
    No interactions: who rated what lives in the graphs alone (the retrieval model's `rated_items`)."""
    return {
        "preset": preset.to_dict(),
        "candidate_count": preset.candidate_count,
        "items": {item_id: {"title": item.title, "genres": list(item.genres)} for item_id, item in data.items.items()},
        "popular_item_ids": popularity_order(data.items, fit.rating_counts),
        "user_ids": list(fit.user_ids),
        "serves_interactions": preset.user_history,
        "data_source": str(data.source),
    }


@dataclass(frozen=True)
class TrainedExport:
    version: int
    retrieval: RetrievalServing
    ranking: RankingServing
    retrieval_model: RetrievalModel
    ranking_model: RankingModel


SYNTHETIC_PREFIX = "synthetic-"
PADDING_NOISE = 0.5


def pad_catalog(item_ids: list[str], item_embeddings: tf.Tensor, count: int, seed: int) -> tuple[list[str], tf.Tensor]:
    """Add `count` synthetic movies (ids "synthetic-<n>", no titles) to the retrieval index only: a
    way to measure retrieval at catalog scale. Each is a real movie's embedding plus Gaussian noise of
    PADDING_NOISE times the real embeddings' spread per dimension: a catalog's structure (movies
    near each other in taste) planted at scale. Independent Gaussian embeddings would have none: an
    index that skips movies must then probe a large share of them to find a query's top k
    (docs/performance.md "Catalog scale")."""
    if not count:
        return item_ids, item_embeddings
    real = item_embeddings.numpy()
    rng = np.random.default_rng(seed)
    near = real[rng.integers(0, len(real), count)]
    synthetic = (near + rng.normal(0.0, PADDING_NOISE, size=near.shape) * real.std(axis=0)).astype(np.float32)
    return item_ids + [f"{SYNTHETIC_PREFIX}{n}" for n in range(count)], tf.constant(np.concatenate([real, synthetic]))


def fit_in_memory(data: MovieLens, holdout: str, stored: StoredRatings | None = None) -> FitData:
    """The fit rows of data held in memory, with the store's ratings after them (erased users' rows
    left out of both)."""
    fit_rows = fit_and_held_out(data.ratings, holdout)[0]
    if stored is not None:
        fit_rows = stored.without_forgotten(fit_rows, data.names)
    return from_rows(fit_rows, data.rating_scale, stored and stored.rows, data.names)


def train_and_export(data: MovieLens, preset: Preset, out_dir: Path, holdout: str = "test",
                     synthetic_items: int = 0, strategy: str = "default",
                     shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                     stored: StoredRatings | None = None, fixed: frozenset[str] = frozenset()) -> TrainedExport | None:
    """Train retrieval then ranking and write them as the next version.

    holdout="test" trains on the fixed train split (what is served and reported);
    "validation" trains on train minus the validation split, for tuning.
    synthetic_items pads the retrieval index for catalog-scale benchmarks (never for serving users).
    With strategy "multi-worker" every worker trains its shard of each batch and only the
    chief writes the export; the others return None. `stored`: ratings recorded through the
    service (export/stored.py), added to the fit rows.
    Data loaded without ratings (`load_movielens(with_ratings=False)`) are streamed from the
    ratings file through a shuffle buffer of `shuffle_buffer` rows instead of held in memory.
    The preset is fitted to the data's size (export/scale.py) except for the `fixed` fields.
    """
    distribution = make_strategy(strategy)
    tf.keras.utils.set_random_seed(preset.seed)
    if data.ratings is None:
        fit = from_stream(data, holdout, shuffle_buffer)
        print(f"streaming {fit.row_count} fit rows from {data.source / data.spec.ratings_file}", flush=True)
    else:
        fit = fit_in_memory(data, holdout, stored)
        if stored is not None:
            print(stored.summary(), flush=True)
    user_ids, item_ids = fit.user_ids, data.item_ids
    preset, scale_choices = fit_to_data(preset, len(user_ids), len(item_ids), fit.row_count, fixed)
    for field, choice in scale_choices.items():
        print(f"  {field} = {choice['value']}: {choice['reason']}", flush=True)
    metadata = build_metadata(data, fit, preset)
    metadata["scale"] = scale_choices
    metadata["holdout"] = holdout
    metadata["dataset"] = data.dataset
    metadata["streamed"] = data.ratings is None
    if stored is not None:
        metadata["stored_ratings"] = {"added": len(stored.rows), "new_users": stored.new_users,
                                      "skipped_unknown_movies": stored.unknown_movies, "skipped_unrated": stored.unrated,
                                      "skipped_in_data_set": stored.in_data_set, "erased_users_left_out": len(stored.forgotten)}
    started = time.perf_counter()
    retrieval = train_retrieval(fit, item_ids, preset, distribution)
    retrieval_seconds = time.perf_counter() - started
    print(f"retrieval trained in {retrieval_seconds:.1f}s", flush=True)
    started = time.perf_counter()
    ranking = train_ranking(fit, item_ids, preset, distribution)
    ranking_seconds = time.perf_counter() - started
    print(f"ranking trained in {ranking_seconds:.1f}s", flush=True)

    metadata["strategy"] = {"name": strategy, "replicas": distribution.num_replicas_in_sync}
    chief = is_chief(distribution)
    # Every worker runs the export steps (they read distributed variables together); only
    # the chief's copy is kept.
    target = out_dir if chief else Path(tempfile.mkdtemp(prefix="recsys-worker-export-"))
    started = time.perf_counter()
    index_item_ids, item_embeddings = pad_catalog(item_ids, retrieval.index_item_model(tf.constant(item_ids)),
                                                  synthetic_items, preset.seed)
    metadata["synthetic_items"] = synthetic_items
    history = ServedHistory(user_ids, item_ids, fit.rated_item_ids, fit.rated_stars, name="history")
    index_users = ServedUserTower(TowerParts.of(retrieval.index_user_model), history, name="user_tower")
    started_item_item = time.perf_counter()
    fitted = history_matrix(user_ids, item_ids, fit.rated_item_ids)
    if preset.similar_space == "co_rating":
        similarity, metadata["similar_svd"] = co_rating_factors(fitted, preset.similar_dim, preset.seed)
        metadata["similar_space"] = "co_rating"
    else:
        similarity, metadata["similar_space"] = item_towers_by_member(ranking, retrieval, item_ids), "item_towers"
    retrieval_serving = RetrievalServing(
        history, index_users, item_embeddings, index_item_ids, preset.candidate_count, similarity,
        index=choose_index(preset, len(index_item_ids), preset.candidate_count),
        similar_index=choose_index(preset, len(item_ids), SIMILAR_CANDIDATES), seed=preset.seed)
    metadata["indexes"] = retrieval_serving.index_records()
    for name, built in metadata["indexes"].items():
        recall = f"; recall@{built['recall_at']} {built['recall']}" if "recall" in built else ""
        if "recall" in built and "partitioned_ms" in built:
            recall += (f", {built['partitioned_ms']} ms for {built['timed_batch']} queries against brute force's "
                       f"{built['brute_force_ms']}")
        print(f"  {name} index: {built['reason']}{recall}", flush=True)
    metadata["train_seconds"] = {"retrieval": round(retrieval_seconds, 1), "ranking": round(ranking_seconds, 1)}
    item_item = None
    if preset.uses_ease:
        item_item = ItemItem(ease_weights(fitted, preset.ease_lambda).astype(np.float32),
                             preset.ease_weight, preset.ease_weight_new_users)
    print(f"item-item weights and similar-items space in {time.perf_counter() - started_item_item:.1f}s", flush=True)
    ranking_serving = RankingServing(ranking, history, item_ids, retrieval.user_model, retrieval.item_model,
                                     item_item)
    version = write_export(target, retrieval_serving, ranking_serving, metadata, warmup_user_ids=user_ids[:4])
    if not chief:
        shutil.rmtree(target, ignore_errors=True)
        print("worker done; the chief writes the export", flush=True)
        return None
    print(f"exported version {version} to {out_dir} in {time.perf_counter() - started:.1f}s", flush=True)
    return TrainedExport(version, retrieval_serving, ranking_serving, retrieval, ranking)
