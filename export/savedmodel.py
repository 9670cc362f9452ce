"""Write one trained pair as TF Serving SavedModels plus the metadata the server needs.

Layout (one integer version names one pair):
    DIR/retrieval/<v>/   SavedModel, signatures `serving_default`, `include_rated`
    DIR/ranking/<v>/     SavedModel, signature `serving_default`
    DIR/metadata/<v>.json  titles, genres, popularity, known users, rated movies, preset
    DIR/models.config    ModelServerConfig for `tensorflow_model_server --model_config_file`
Each SavedModel has assets.extra/tf_serving_warmup_requests for --enable_model_warmup.
Metadata and ranking are written before retrieval: a version is complete once retrieval/<v> exists.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from export.index import BruteForceIndex
from export.models import RaggedTable
from server.layout import (
    DEFAULT_SIGNATURE,
    INCLUDE_RATED_SIGNATURE,
    METADATA_DIR,
    RANKING_MODEL,
    RETRIEVAL_MODEL,
    WARMUP_FILE,
)

OUT_OF_VOCABULARY_PROBE = "\x00out-of-vocabulary"
TABLE_CHUNK = 4096


def tower_table(tower: tf.keras.Model, vocabulary: list[str]) -> np.ndarray:
    """The tower's output for every id of `vocabulary`, after a row 0 with its output for an
    unknown id: the same layout as a StringLookup over `vocabulary` with one OOV bucket."""
    ids = [OUT_OF_VOCABULARY_PROBE] + vocabulary
    return np.concatenate([tower(tf.constant(ids[start:start + TABLE_CHUNK])).numpy()
                           for start in range(0, len(ids), TABLE_CHUNK)])


class LookupTower(tf.keras.layers.Layer):
    """Id -> a precomputed row (row 0 for unknown ids).

    At serving time a tower's output depends only on the id, so the export stores its
    outputs instead of its layers: a lookup and one gather per request instead of the
    history sums, embedding lookups and first MLP layer.
    """

    def __init__(self, vocabulary: list[str], table: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        self.lookup = tf.keras.layers.StringLookup(vocabulary=vocabulary, mask_token=None)
        self.table = tf.Variable(table, trainable=False, name="table")

    def rows(self, ids: tf.Tensor) -> tf.Tensor:
        return self.lookup(ids)

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        return tf.gather(self.table, self.lookup(ids))


class RetrievalServing(tf.Module):
    """User id -> top `candidate_count` movie ids and scores from a BruteForce index.

    The user tower is stored as its output per known user (`LookupTower`). Movies each user
    rated in training are a ragged table of catalog positions in the same row order, excluded
    by `serving_default`; `include_rated` skips that filter.
    """

    def __init__(self, user_model: tf.keras.Model, user_ids: list[str], item_embeddings: tf.Tensor,
                 item_ids: list[str], rated_by_user: dict[str, list[str]], candidate_count: int):
        super().__init__()
        position = {item_id: index for index, item_id in enumerate(item_ids)}
        rated_positions = [[position[item] for item in rated_by_user.get(user, [])] for user in user_ids]
        max_rated = max((len(row) for row in rated_positions), default=0)
        if candidate_count + max_rated > len(item_ids):
            raise ValueError(
                f"candidate_count {candidate_count} + most movies rated by one user {max_rated} "
                f"exceeds the catalog ({len(item_ids)} movies)"
            )
        self.candidate_count = candidate_count
        self.item_ids = tf.Variable(item_ids, dtype=tf.string, trainable=False, name="item_ids")
        self.user_tower = LookupTower(user_ids, tower_table(user_model, user_ids), name="user_tower")
        self.index = BruteForceIndex(item_embeddings, name="index")
        # Same row order as the user tower's table: row 0 (unknown users) has nothing to exclude.
        self.rated = RaggedTable(rated_positions, np.int32, name="rated")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user_id")])
    def retrieve(self, user_id: tf.Tensor) -> dict[str, tf.Tensor]:
        # A fed tensor bypasses the placeholder's shape: without this check a scalar or [1, 1]
        # user_id reaches RaggedGather, whose CHECK aborts the whole TF Serving process
        # (tensorflow/tensorflow#85242). EnsureShape answers INVALID_ARGUMENT instead.
        user_id = tf.ensure_shape(user_id, [None])
        # The row splits were checked at export: checking them on every request would add a
        # conditional Assert to the graph (a measurable share of an in-process request).
        excluded = self.rated.rows(self.user_tower.rows(user_id), validate=False)
        scores, positions = self.index(self.user_tower(user_id), self.candidate_count, excluded)
        return {"item_ids": tf.gather(self.item_ids, positions), "scores": scores}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user_id")])
    def retrieve_including_rated(self, user_id: tf.Tensor) -> dict[str, tf.Tensor]:
        user_id = tf.ensure_shape(user_id, [None])
        scores, positions = self.index(self.user_tower(user_id), self.candidate_count)
        return {"item_ids": tf.gather(self.item_ids, positions), "scores": scores}


class RankingServing(tf.Module):
    """(user id, movie id) pairs -> predicted stars and the score the service orders by.

    With a watch head, `score` = the ranker's watch logit + the retrieval towers' dot
    product: two independently trained estimates of log p(movie | user) up to a
    per-user constant, so their sum orders each user's candidates like an ensemble.
    The retrieval towers are copied into this SavedModel as frozen outputs (training
    the ranker never touches them). Without a watch head, `score` is the rating.

    Served from precomputed tables, equal to the trained model up to float rounding:
    the two dot products are one dot product of concatenated [watch, retrieval] vectors,
    and the rating MLP's first layer W [user; movie] + b is split into a per-user and a
    per-movie part, so a pair costs two gathers, an add and the remaining small layers.
    """

    def __init__(self, ranking_model: tf.keras.Model, user_ids: list[str], item_ids: list[str],
                 retrieval_user_model: tf.keras.Model | None = None,
                 retrieval_item_model: tf.keras.Model | None = None):
        super().__init__()
        rating = ranking_model.rating
        first, *rest = rating.mlp.layers
        rating_users = tower_table(rating.user_model, user_ids)
        rating_items = tower_table(rating.item_model, item_ids)
        kernel, bias = first.kernel.numpy(), first.bias.numpy()
        self.first_activation = first.activation
        self.rest = rest
        self.user_hidden = LookupTower(user_ids, rating_users @ kernel[:rating_users.shape[1]], name="user_hidden")
        self.item_hidden = LookupTower(item_ids, rating_items @ kernel[rating_users.shape[1]:] + bias,
                                       name="item_hidden")
        self.orders_by_watch = bool(ranking_model.watch_weight)
        if self.orders_by_watch:
            self.user_vectors = LookupTower(user_ids, np.concatenate(
                [tower_table(ranking_model.watch_user_model, user_ids), tower_table(retrieval_user_model, user_ids)],
                axis=1), name="user_vectors")
            self.item_vectors = LookupTower(item_ids, np.concatenate(
                [tower_table(ranking_model.watch_item_model, item_ids), tower_table(retrieval_item_model, item_ids)],
                axis=1), name="item_vectors")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user_id"),
                                  tf.TensorSpec([None], tf.string, name="item_id")])
    def rank(self, user_id: tf.Tensor, item_id: tf.Tensor) -> dict[str, tf.Tensor]:
        user_id, item_id = tf.ensure_shape(user_id, [None]), tf.ensure_shape(item_id, [None])
        hidden = self.first_activation(self.user_hidden(user_id) + self.item_hidden(item_id))
        for layer in self.rest:
            hidden = layer(hidden)
        predicted_rating = hidden[:, 0]
        if self.orders_by_watch:
            score = tf.reduce_sum(self.user_vectors(user_id) * self.item_vectors(item_id), axis=1)
        else:
            score = tf.identity(predicted_rating)
        return {"predicted_rating": predicted_rating, "score": score}


def next_version(out_dir: Path) -> int:
    """The next integer version unused by any model or metadata in out_dir (never overwrite a served one)."""
    used = [int(p.name) for name in (RETRIEVAL_MODEL, RANKING_MODEL) if (out_dir / name).is_dir()
            for p in (out_dir / name).iterdir() if p.name.isdigit()]
    metadata_dir = out_dir / METADATA_DIR
    if metadata_dir.is_dir():
        used += [int(p.stem) for p in metadata_dir.glob("*.json") if p.stem.isdigit()]
    return max(used, default=0) + 1


def warmup_requests(model_name: str, signature_name: str, inputs: list[dict[str, list[str]]]) -> list[bytes]:
    records = []
    for request_inputs in inputs:
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature_name))
        for key, values in request_inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(values, dtype=tf.string))
        log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
        records.append(log.SerializeToString())
    return records


def _save(module: tf.Module, signatures: dict, target: Path, warmup: list[bytes]) -> None:
    """Save into a hidden sibling, then rename: TF Serving never sees a half-written version."""
    staging = target.parent / f".staging-{target.name}"
    shutil.rmtree(staging, ignore_errors=True)
    # Keras warns that subclassed models have no get_config; SavedModel does not need one.
    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")
    try:
        tf.saved_model.save(module, str(staging), signatures=signatures)
    finally:
        logger.setLevel(level)
    extra = staging / "assets.extra"
    extra.mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(extra / WARMUP_FILE)) as writer:
        for record in warmup:
            writer.write(record)
    staging.rename(target)


def write_models_config(out_dir: Path) -> Path:
    config = model_server_config_pb2.ModelServerConfig()
    for name in (RETRIEVAL_MODEL, RANKING_MODEL):
        entry = config.model_config_list.config.add()
        entry.name = name
        entry.base_path = str((out_dir / name).resolve())
        entry.model_platform = "tensorflow"
        # Keep two versions so a client pinned to the previous pair still resolves during a rollout.
        entry.model_version_policy.latest.num_versions = 2
    path = out_dir / "models.config"
    path.write_text(text_format.MessageToString(config))
    return path


def write_export(out_dir: Path, retrieval: RetrievalServing, ranking: RankingServing, metadata: dict,
                 warmup_user_ids: list[str]) -> int:
    """Write retrieval, ranking and metadata under the next free version; return it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (RETRIEVAL_MODEL, RANKING_MODEL, METADATA_DIR):
        (out_dir / name).mkdir(exist_ok=True)
    version = next_version(out_dir)
    sample_items = metadata["popular_item_ids"][:8]
    retrieval_warmup = warmup_requests(RETRIEVAL_MODEL, DEFAULT_SIGNATURE,
                                       [{"user_id": [user]} for user in warmup_user_ids]
                                       + [{"user_id": warmup_user_ids}])
    retrieval_warmup += warmup_requests(RETRIEVAL_MODEL, INCLUDE_RATED_SIGNATURE, [{"user_id": warmup_user_ids[:1]}])
    ranking_warmup = warmup_requests(RANKING_MODEL, DEFAULT_SIGNATURE,
                                     [{"user_id": [user] * len(sample_items), "item_id": sample_items}
                                      for user in warmup_user_ids])
    # Metadata, then ranking, then retrieval: whoever sees retrieval/<v> finds the rest of the pair.
    metadata = {**metadata, "model_version": version}
    staging = out_dir / METADATA_DIR / f".{version}.json.tmp"
    staging.write_text(json.dumps(metadata))
    staging.rename(out_dir / METADATA_DIR / f"{version}.json")
    _save(ranking, {DEFAULT_SIGNATURE: ranking.rank}, out_dir / RANKING_MODEL / str(version), ranking_warmup)
    _save(retrieval, {DEFAULT_SIGNATURE: retrieval.retrieve, INCLUDE_RATED_SIGNATURE: retrieval.retrieve_including_rated},
          out_dir / RETRIEVAL_MODEL / str(version), retrieval_warmup)
    write_models_config(out_dir)
    return version
