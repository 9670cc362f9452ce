"""The two stages as small Keras/TFRS pieces. Each stage owns its own towers."""
from __future__ import annotations

import numpy as np
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


class HistoryUserTower(tf.keras.Model):
    """User id -> id embedding + normalised sum of the embeddings of the movies they rated.

    The rated movies are a table inside the tower, so serving still needs only the
    user id. In training, the example's own movie is left out of the history so the
    tower cannot learn to copy it.
    """

    def __init__(self, user_ids: list[str], item_ids: list[str], history: dict[str, list[str]], dim: int,
                 l2: float, name: str = "history_user_tower"):
        super().__init__(name=name)
        regularizer = tf.keras.regularizers.l2(l2) if l2 else None
        self.user_lookup = tf.keras.layers.StringLookup(vocabulary=user_ids, mask_token=None)
        self.item_lookup = tf.keras.layers.StringLookup(vocabulary=item_ids, mask_token=None)
        self.user_embedding = tf.keras.layers.Embedding(len(user_ids) + 1, dim, embeddings_regularizer=regularizer)
        self.history_embedding = tf.keras.layers.Embedding(len(item_ids) + 1, dim, embeddings_regularizer=regularizer)
        position = {item_id: index + 1 for index, item_id in enumerate(item_ids)}
        rows = [[]] + [[position[item] for item in history.get(user, [])] for user in user_ids]
        self.history_values = tf.Variable(np.asarray([p for row in rows for p in row], dtype=np.int64),
                                          trainable=False, name="history_values")
        self.history_row_splits = tf.Variable(np.cumsum([0] + [len(row) for row in rows]).astype(np.int64),
                                              trainable=False, name="history_row_splits")

    def call(self, inputs) -> tf.Tensor:
        """`inputs`: user ids, or {"user_id", "leave_out_item_id"} while training.

        A left-out movie must be in the user's history, as every training row is.
        """
        leave_out = None
        if isinstance(inputs, dict):
            inputs, leave_out = inputs["user_id"], inputs.get("leave_out_item_id")
        users = self.user_lookup(inputs)
        # Sum each distinct user's history once, however many rows of the batch they have.
        unique_users, row_of_example = tf.unique(users, out_idx=tf.int64)
        history = tf.gather(tf.RaggedTensor.from_row_splits(self.history_values, self.history_row_splits), unique_users)
        summed = tf.math.unsorted_segment_sum(self.history_embedding(history.values), history.value_rowids(),
                                              tf.shape(unique_users, out_type=tf.int64)[0])
        summed = tf.gather(summed, row_of_example)
        count = tf.cast(tf.gather(history.row_lengths(), row_of_example), tf.float32)
        if leave_out is not None:
            summed -= self.history_embedding(self.item_lookup(leave_out))
            count -= 1.0
        return self.user_embedding(users) + summed / tf.sqrt(tf.maximum(count, 1.0))[:, None]


def mean_over_global_batch(loss_sum: tf.Tensor, replica_batch_size: tf.Tensor) -> tf.Tensor:
    """A summed loss as a mean over the global batch: under tf.distribute every replica's
    gradients are summed, so each replica divides by the whole batch, not its share."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss_sum / tf.cast(replica_batch_size * replicas, loss_sum.dtype)


def catalog_logits(user_embeddings: tf.Tensor, item_model: tf.keras.Model, catalog_item_ids: tf.Tensor) -> tf.Tensor:
    """Dot-product logits of each user against every movie in the catalog."""
    return tf.matmul(user_embeddings, item_model(catalog_item_ids), transpose_b=True)


class RetrievalModel(tfrs.Model):
    """Two towers whose dot product scores (user, movie).

    `full_softmax` trains against every movie in the catalog (1,682 is cheap to
    score), `in_batch` is the TFRS tutorial's in-batch sampled softmax.
    """

    def __init__(self, user_ids: list[str], item_ids: list[str], history: dict[str, list[str]], preset: Preset):
        super().__init__()
        self.loss_kind = preset.retrieval_loss
        self.uses_history = preset.user_history
        if preset.user_history:
            self.user_model = HistoryUserTower(user_ids, item_ids, history, preset.embedding_dim, preset.retrieval_l2)
        else:
            self.user_model = id_tower(user_ids, preset.embedding_dim, preset.retrieval_l2, "user_tower")
        self.item_model = id_tower(item_ids, preset.embedding_dim, preset.retrieval_l2, "item_tower")
        self.catalog_item_ids = tf.constant(item_ids)
        self.task = tfrs.tasks.Retrieval()
        self.softmax_loss = tf.keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.SUM)

    def compute_loss(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        if self.uses_history:
            user_embeddings = self.user_model({"user_id": features["user_id"], "leave_out_item_id": features["item_id"]})
        else:
            user_embeddings = self.user_model(features["user_id"])
        if self.loss_kind == "in_batch":
            item_embeddings = self.item_model(features["item_id"])
            return self.task(user_embeddings, item_embeddings, compute_metrics=False)
        # Every movie in the catalog is a candidate; the label is the rated movie's catalog position.
        logits = catalog_logits(user_embeddings, self.item_model, self.catalog_item_ids)
        labels = self.item_model.layers[0](features["item_id"]) - 1
        return mean_over_global_batch(self.softmax_loss(labels, logits), tf.shape(labels)[0])


class RankingModel(tfrs.Model):
    """Two heads, each with its own user and movie towers.

    - rating: an MLP over rating embeddings predicting the star rating (MSE), reported
      as `predicted_rating`;
    - watch (when `preset.watch_weight` > 0): the dot product of watch embeddings,
      trained as a softmax over the catalog ("which movie does this user rate next"),
      which is what the service orders by. Separate towers keep the rating loss from
      pulling the watch embeddings towards "well rated" instead of "watched".
    """

    def __init__(self, user_ids: list[str], item_ids: list[str], preset: Preset,
                 history: dict[str, list[str]] | None = None):
        super().__init__()
        self.watch_weight = preset.watch_weight
        self.rating_history = preset.rating_user_history
        if self.rating_history:
            self.rating_user_model = HistoryUserTower(user_ids, item_ids, history or {}, preset.embedding_dim,
                                                      preset.rating_l2, name="rating_history_user_tower")
        else:
            self.rating_user_model = id_tower(user_ids, preset.embedding_dim, preset.rating_l2, "rating_user_tower")
        self.rating_item_history = preset.rating_item_history
        if self.rating_item_history:
            raters: dict[str, list[str]] = {}
            for user, items in (history or {}).items():
                for item in items:
                    raters.setdefault(item, []).append(user)
            self.rating_item_model = HistoryUserTower(item_ids, user_ids, raters, preset.embedding_dim,
                                                      preset.rating_l2, name="rating_history_item_tower")
        else:
            self.rating_item_model = id_tower(item_ids, preset.embedding_dim, preset.rating_l2, "rating_item_tower")
        self.mlp = tf.keras.Sequential(
            [tf.keras.layers.Dense(units, activation="relu") for units in preset.ranking_layers]
            + [tf.keras.layers.Dense(1)],
            name="rating_mlp",
        )
        self.rating_task = tfrs.tasks.Ranking(
            loss=tf.keras.losses.MeanSquaredError(reduction=tf.keras.losses.Reduction.SUM),
            metrics=[tf.keras.metrics.RootMeanSquaredError(name="rmse")],
        )
        if self.watch_weight:
            self.watch_user_model = id_tower(user_ids, preset.embedding_dim, 0.0, "watch_user_tower")
            self.watch_item_model = id_tower(item_ids, preset.embedding_dim, 0.0, "watch_item_tower")
            self.catalog_item_ids = tf.constant(item_ids)
            self.watch_loss = tf.keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction=tf.keras.losses.Reduction.SUM)

    def call(self, features: dict[str, tf.Tensor], leave_out_rated: bool = False) -> tf.Tensor:
        """Predicted star rating, [batch, 1]. `leave_out_rated` (training): the example's movie is
        dropped from the user's history, as it will not be there for a movie to predict."""
        if self.rating_history and leave_out_rated:
            user_embeddings = self.rating_user_model({"user_id": features["user_id"],
                                                      "leave_out_item_id": features["item_id"]})
        else:
            user_embeddings = self.rating_user_model(features["user_id"])
        if self.rating_item_history and leave_out_rated:
            item_embeddings = self.rating_item_model({"user_id": features["item_id"],
                                                      "leave_out_item_id": features["user_id"]})
        else:
            item_embeddings = self.rating_item_model(features["item_id"])
        return self.mlp(tf.concat([user_embeddings, item_embeddings], axis=1))

    def watch_logit(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
        return tf.reduce_sum(self.watch_user_model(features["user_id"]) * self.watch_item_model(features["item_id"]),
                             axis=1)

    def compute_loss(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        batch = tf.shape(features["rating"])[0]
        # Labels as [batch, 1] like the predictions, so the summed loss is per example.
        summed = self.rating_task(labels=features["rating"][:, None], predictions=self(features, leave_out_rated=True))
        loss = mean_over_global_batch(summed, batch)
        if self.watch_weight:
            logits = catalog_logits(self.watch_user_model(features["user_id"]), self.watch_item_model,
                                    self.catalog_item_ids)
            labels = self.watch_item_model.layers[0](features["item_id"]) - 1
            loss += self.watch_weight * mean_over_global_batch(self.watch_loss(labels, logits), batch)
        return loss


def make_optimizer(name: str, learning_rate: float) -> tf.keras.optimizers.Optimizer:
    optimizers = {"adagrad": tf.keras.optimizers.Adagrad, "adam": tf.keras.optimizers.Adam}
    return optimizers[name](learning_rate=learning_rate)
