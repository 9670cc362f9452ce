"""Train both stages on the train split and write them as one export version."""
from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from export.data import MovieLens, fit_and_held_out
from export.models import RankingModel, RetrievalModel, make_optimizer
from export.presets import Preset
from export.savedmodel import RankingServing, RetrievalServing, write_export


class EpochLine(tf.keras.callbacks.Callback):
    """One concise progress line per epoch."""

    def __init__(self, stage: str, epochs: int, every: int = 1):
        super().__init__()
        self.stage, self.epochs, self.every = stage, epochs, every
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if (epoch + 1) % self.every and epoch + 1 != self.epochs:
            return
        metrics = " ".join(f"{key}={value:.4f}" for key, value in (logs or {}).items()
                           if key in ("loss", "total_loss", "rmse", "root_mean_squared_error"))
        print(f"  [{self.stage}] epoch {epoch + 1}/{self.epochs} {metrics} "
              f"({time.perf_counter() - self.started:.1f}s)", flush=True)


def as_features(rows: np.ndarray, rating_scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "user_id": rows[:, 0].astype(str),
        "item_id": rows[:, 1].astype(str),
        "rating": rows[:, 2].astype(np.float32) * rating_scale,
    }


def dataset(rows: np.ndarray, batch_size: int, seed: int, rating_scale: float = 1.0) -> tf.data.Dataset:
    """Reshuffled every epoch; shuffles row indices and gathers, which is far cheaper than shuffling strings."""
    columns = {name: tf.constant(values) for name, values in as_features(rows, rating_scale).items()}
    return (tf.data.Dataset.range(len(rows))
            .shuffle(len(rows), seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size)
            .map(lambda index: {name: tf.gather(values, index) for name, values in columns.items()})
            .prefetch(tf.data.AUTOTUNE))


STRATEGIES = ("default", "mirrored", "multi-worker")


def make_strategy(name: str) -> tf.distribute.Strategy:
    """default: this process's devices as they are; mirrored: all local devices;
    multi-worker: MultiWorkerMirroredStrategy with the cluster from the standard TF_CONFIG."""
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


def train_retrieval(train: np.ndarray, user_ids: list[str], item_ids: list[str], history: dict[str, list[str]],
                    preset: Preset, strategy: tf.distribute.Strategy | None = None) -> RetrievalModel:
    with (strategy or tf.distribute.get_strategy()).scope():
        model = RetrievalModel(user_ids, item_ids, history, preset)
        model.compile(optimizer=make_optimizer(preset.retrieval_optimizer, preset.retrieval_learning_rate))
    model.fit(dataset(train, preset.retrieval_batch_size, preset.seed), epochs=preset.retrieval_epochs,
              verbose=0, callbacks=[EpochLine("retrieval", preset.retrieval_epochs)])
    return model


def train_ranking(train: np.ndarray, user_ids: list[str], item_ids: list[str], preset: Preset,
                  rating_scale: float = 1.0, strategy: tf.distribute.Strategy | None = None) -> RankingModel:
    with (strategy or tf.distribute.get_strategy()).scope():
        model = RankingModel(user_ids, item_ids, preset)
        model.compile(optimizer=make_optimizer(preset.ranking_optimizer, preset.ranking_learning_rate))
    every = max(1, preset.ranking_epochs // 10)
    model.fit(dataset(train, preset.ranking_batch_size, preset.seed + 1, rating_scale), epochs=preset.ranking_epochs,
              verbose=0, callbacks=[EpochLine("ranking", preset.ranking_epochs, every)])
    return model


def build_metadata(data: MovieLens, train: np.ndarray, preset: Preset) -> dict:
    """What the server needs beside the graphs: display data, popularity, who rated what."""
    counts = Counter(train[:, 1].tolist())
    # Most rated first; ties broken by movie id so the order is reproducible.
    popular = sorted(data.items, key=lambda item_id: (-counts.get(int(item_id), 0), int(item_id)))
    rated: dict[str, list[str]] = {}
    for user, item in train[:, :2].tolist():
        rated.setdefault(str(user), []).append(str(item))
    return {
        "preset": preset.to_dict(),
        "candidate_count": preset.candidate_count,
        "items": {item_id: {"title": item.title, "genres": list(item.genres)} for item_id, item in data.items.items()},
        "popular_item_ids": popular,
        "rated_item_ids": rated,
        "data_source": str(data.source),
    }


@dataclass(frozen=True)
class TrainedExport:
    version: int
    retrieval: RetrievalServing
    ranking: RankingServing


SYNTHETIC_PREFIX = "synthetic-"


def pad_catalog(item_ids: list[str], item_embeddings: tf.Tensor, count: int, seed: int) -> tuple[list[str], tf.Tensor]:
    """Add `count` synthetic movies (ids "synthetic-<n>", random embeddings with the real ones'
    spread) to the retrieval index only: a way to measure retrieval cost at catalog scale."""
    if not count:
        return item_ids, item_embeddings
    real = item_embeddings.numpy()
    rng = np.random.default_rng(seed)
    synthetic = rng.normal(real.mean(axis=0), real.std(axis=0), size=(count, real.shape[1])).astype(np.float32)
    return item_ids + [f"{SYNTHETIC_PREFIX}{n}" for n in range(count)], tf.constant(np.concatenate([real, synthetic]))


def train_and_export(data: MovieLens, preset: Preset, out_dir: Path, holdout: str = "test",
                     synthetic_items: int = 0, strategy: str = "default") -> TrainedExport | None:
    """Train retrieval then ranking and write them as the next version.

    holdout="test" trains on the fixed train split (what is served and reported);
    "validation" trains on train minus the validation split, for tuning.
    synthetic_items pads the retrieval index for catalog-scale benchmarks (never for serving users).
    With strategy "multi-worker" every worker trains its shard of each batch and only the
    chief writes the export; the others return None.
    """
    distribution = make_strategy(strategy)
    tf.keras.utils.set_random_seed(preset.seed)
    train, _ = fit_and_held_out(data.ratings, holdout)
    user_ids = sorted({str(u) for u in train[:, 0]}, key=int)
    item_ids = sorted(data.items, key=int)
    metadata = build_metadata(data, train, preset)
    metadata["holdout"] = holdout
    metadata["dataset"] = data.dataset
    started = time.perf_counter()
    retrieval = train_retrieval(train, user_ids, item_ids, metadata["rated_item_ids"], preset, distribution)
    retrieval_seconds = time.perf_counter() - started
    print(f"retrieval trained in {retrieval_seconds:.1f}s", flush=True)
    started = time.perf_counter()
    ranking = train_ranking(train, user_ids, item_ids, preset, data.rating_scale, distribution)
    ranking_seconds = time.perf_counter() - started
    print(f"ranking trained in {ranking_seconds:.1f}s", flush=True)

    metadata["strategy"] = {"name": strategy, "replicas": distribution.num_replicas_in_sync}
    chief = is_chief(distribution)
    # Every worker runs the export steps (they read distributed variables together); only
    # the chief's copy is kept.
    target = out_dir if chief else Path(tempfile.mkdtemp(prefix="recsys-worker-export-"))
    started = time.perf_counter()
    index_item_ids, item_embeddings = pad_catalog(item_ids, retrieval.item_model(tf.constant(item_ids)),
                                                  synthetic_items, preset.seed)
    metadata["synthetic_items"] = synthetic_items
    retrieval_serving = RetrievalServing(retrieval.user_model, item_embeddings, index_item_ids,
                                         metadata["rated_item_ids"], preset.candidate_count)
    metadata["train_seconds"] = {"retrieval": round(retrieval_seconds, 1), "ranking": round(ranking_seconds, 1)}
    ranking_serving = RankingServing(ranking, retrieval.user_model, retrieval.item_model)
    version = write_export(target, retrieval_serving, ranking_serving, metadata, warmup_user_ids=user_ids[:4])
    if not chief:
        shutil.rmtree(target, ignore_errors=True)
        print("worker done; the chief writes the export", flush=True)
        return None
    print(f"exported version {version} to {out_dir} in {time.perf_counter() - started:.1f}s", flush=True)
    return TrainedExport(version, retrieval_serving, ranking_serving)
