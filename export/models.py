"""The two stages as small Keras/TFRS pieces. Each stage owns its own towers."""
from __future__ import annotations

import tensorflow as tf
import tensorflow_recommenders as tfrs

from export.presets import Preset


def id_tower(vocabulary: list[str], dim: int, l2: float, name: str) -> tf.keras.Model:
    """String id -> embedding. Index 0 is the out-of-vocabulary row."""
    regularizer = tf.keras.regularizers.l2(l2) if l2 else None
    return tf.keras.Sequential(
        [
            tf.keras.layers.StringLookup(vocabulary=vocabulary, mask_token=None, name=f"{name}_lookup"),
            tf.keras.layers.Embedding(len(vocabulary) + 1, dim, embeddings_regularizer=regularizer, name=f"{name}_embedding"),
        ],
        name=name,
    )


class RetrievalModel(tfrs.Model):
    """Two towers whose dot product scores (user, movie).

    `full_softmax` trains against every movie in the catalog (1,682 is cheap to
    score), `in_batch` is the TFRS tutorial's in-batch sampled softmax.
    """

    def __init__(self, user_ids: list[str], item_ids: list[str], preset: Preset):
        super().__init__()
        self.loss_kind = preset.retrieval_loss
        self.user_model = id_tower(user_ids, preset.embedding_dim, preset.retrieval_l2, "user_tower")
        self.item_model = id_tower(item_ids, preset.embedding_dim, preset.retrieval_l2, "item_tower")
        self.catalog_item_ids = tf.constant(item_ids)
        self.task = tfrs.tasks.Retrieval()
        self.softmax_loss = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def compute_loss(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        user_embeddings = self.user_model(features["user_id"])
        if self.loss_kind == "in_batch":
            item_embeddings = self.item_model(features["item_id"])
            return self.task(user_embeddings, item_embeddings, compute_metrics=False)
        # Every movie in the catalog is a candidate; the label is the rated movie's catalog position.
        catalog_embeddings = self.item_model(self.catalog_item_ids)
        logits = tf.matmul(user_embeddings, catalog_embeddings, transpose_b=True)
        labels = self.item_model.layers[0](features["item_id"]) - 1
        return self.softmax_loss(labels, logits)


class RankingModel(tfrs.Model):
    """MLP over its own user and movie embeddings, predicting the star rating."""

    def __init__(self, user_ids: list[str], item_ids: list[str], preset: Preset):
        super().__init__()
        self.user_model = id_tower(user_ids, preset.embedding_dim, 0.0, "ranking_user_tower")
        self.item_model = id_tower(item_ids, preset.embedding_dim, 0.0, "ranking_item_tower")
        self.mlp = tf.keras.Sequential(
            [tf.keras.layers.Dense(units, activation="relu") for units in preset.ranking_layers]
            + [tf.keras.layers.Dense(1)],
            name="rating_mlp",
        )
        self.task = tfrs.tasks.Ranking(
            loss=tf.keras.losses.MeanSquaredError(),
            metrics=[tf.keras.metrics.RootMeanSquaredError(name="rmse")],
        )

    def call(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
        user_embeddings = self.user_model(features["user_id"])
        item_embeddings = self.item_model(features["item_id"])
        return self.mlp(tf.concat([user_embeddings, item_embeddings], axis=1))

    def compute_loss(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        predictions = self(features)
        return self.task(labels=features["rating"], predictions=predictions)


def make_optimizer(name: str, learning_rate: float) -> tf.keras.optimizers.Optimizer:
    optimizers = {"adagrad": tf.keras.optimizers.Adagrad, "adam": tf.keras.optimizers.Adam}
    return optimizers[name](learning_rate=learning_rate)
