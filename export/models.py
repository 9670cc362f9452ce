"""The two stages as small Keras/TFRS pieces. Each stage owns its own towers."""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs

from recsys.export.presets import Preset


class IdDropout(tf.keras.layers.Layer):
    """While training, replaces a `rate` share of lookup indices with 0, the out-of-vocabulary row.

    That row then learns a generic user instead of staying at its random start: what a user
    the models have no id for (one known only by the interactions sent with a request) gets.
    """

    def __init__(self, rate: float, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate

    def call(self, indices: tf.Tensor, training=None) -> tf.Tensor:
        if not training or not self.rate:
            return indices
        dropped = tf.random.uniform(tf.shape(indices)) < self.rate
        return tf.where(dropped, tf.zeros_like(indices), indices)


def id_tower(vocabulary: list[str], dim: int, l2: float, name: str, id_dropout: float = 0.0) -> tf.keras.Model:
    """String id -> embedding. Index 0 is the out-of-vocabulary row (see `IdDropout`)."""
    regularizer = tf.keras.regularizers.l2(l2) if l2 else None
    return tf.keras.Sequential(
        [
            tf.keras.layers.StringLookup(vocabulary=vocabulary, mask_token=None, name=f"{name}_lookup"),
            IdDropout(id_dropout, name=f"{name}_id_dropout"),
            tf.keras.layers.Embedding(len(vocabulary) + 1, dim, embeddings_regularizer=regularizer, name=f"{name}_embedding"),
        ],
        name=name,
    )


def embedding_table(tower: tf.keras.Model) -> np.ndarray:
    """An `id_tower`'s embedding rows, in its lookup's order (row 0: out of vocabulary)."""
    return tower.layers[-1].embeddings.numpy()


class RaggedTable(tf.keras.layers.Layer):
    """Per-id rows of values as one ragged table: row 0 (ids outside the vocabulary) is empty,
    then one row per vocabulary id. Stored as values + row splits, so it saves with the model."""

    def __init__(self, rows: list, dtype: type, **kwargs):
        super().__init__(**kwargs)
        self.values = tf.Variable(np.concatenate([np.asarray(row, dtype) for row in rows] + [np.zeros(0, dtype)]),
                                  trainable=False, name="values")
        self.row_splits = tf.Variable(np.cumsum([0, 0] + [len(row) for row in rows]).astype(np.int64),
                                      trainable=False, name="row_splits")

    def rows(self, ids: tf.Tensor, validate: bool = True) -> tf.RaggedTensor:
        """The rows of `ids` (row numbers, 0 for unknown). `validate=False` skips re-checking the
        row splits, which were checked when the table was built (a serving graph's per-call cost)."""
        table = tf.RaggedTensor.from_row_splits(self.values, self.row_splits, validate=validate)
        return tf.gather(table, ids)


class HistoryUserTower(tf.keras.Model):
    """User id -> id embedding + normalised sum of the embeddings of the movies they rated.

    With `stars` (per user, parallel to `history`), a second sum weighs another embedding of
    each rated movie by its stars minus `mean_stars`: how much the user liked it, not only
    that they rated it. The rated movies are a table inside the tower, so serving still needs
    only the user id. In training, the example's own movie (and its stars) is left out of the
    history so the tower cannot learn to copy it.
    """

    def __init__(self, user_ids: list[str], item_ids: list[str], history: dict[str, list[str]], dim: int,
                 l2: float, name: str = "history_user_tower", stars: dict[str, np.ndarray] | None = None,
                 mean_stars: float = 0.0, id_dropout: float = 0.0, history_keep: float = 1.0,
                 history_sample: int = 0):
        super().__init__(name=name)
        self.history_sample = history_sample
        regularizer = tf.keras.regularizers.l2(l2) if l2 else None
        self.user_lookup = tf.keras.layers.StringLookup(vocabulary=user_ids, mask_token=None)
        self.id_dropout, self.history_keep = id_dropout, history_keep
        self.item_lookup = tf.keras.layers.StringLookup(vocabulary=item_ids, mask_token=None)
        self.user_embedding = tf.keras.layers.Embedding(len(user_ids) + 1, dim, embeddings_regularizer=regularizer)
        # With stars, each movie's row holds both of its embeddings, [rated | liked]: one table
        # (two column blocks) serves the two sums.
        self.dim, self.with_stars = dim, stars is not None
        self.history_embedding = tf.keras.layers.Embedding(len(item_ids) + 1, dim * (2 if self.with_stars else 1),
                                                           embeddings_regularizer=regularizer)
        self.history_embedding.build((None,))  # its table is read whole (see _history_sums)
        position = {item_id: index + 1 for index, item_id in enumerate(item_ids)}
        # Row 0 (unknown users) is empty; users' rows follow in vocabulary order.
        self.rated_positions = RaggedTable([[position[item] for item in history.get(user, [])] for user in user_ids],
                                   np.int64, name="rated_positions")
        self.mean_stars = mean_stars
        if self.with_stars:
            self.star_weights = RaggedTable(
                [np.asarray(stars.get(user, []), np.float32) - mean_stars for user in user_ids], np.float32,
                name="star_weights")

    def _weighted(self, embeddings: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        """[rated | liked] rows scaled by [1 | stars - mean], folded into one embedding."""
        return embeddings[:, :self.dim] + embeddings[:, self.dim:] * weights[:, None]

    def _entries(self, ids: tf.Tensor, cap: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """The history entries a step sums for each of `ids`: all of a row's entries where it has at
        most `cap` (or `cap` is 0), else `cap` of them drawn uniformly with replacement.

        Returns each entry's row (index into `ids`), its position in the tables' values, the factor
        (length / drawn) that makes the drawn sum an unbiased estimate of the whole row's sum, and
        each row's length. A step's cost is then at most `cap` per row, however long the histories
        (a popular movie's raters run to tens of thousands).
        """
        splits = self.rated_positions.row_splits
        starts = tf.gather(splits, ids)
        lengths = tf.gather(splits, ids + 1) - starts
        drawn = tf.minimum(lengths, cap) if cap else lengths
        offsets = tf.ragged.range(drawn)
        rows, offset = offsets.value_rowids(), offsets.flat_values
        length, count = tf.gather(lengths, rows), tf.gather(drawn, rows)
        if cap:
            uniform = tf.random.uniform(tf.shape(offset), dtype=tf.float64)
            random_offset = tf.minimum(tf.cast(uniform * tf.cast(length, tf.float64), tf.int64), length - 1)
            offset = tf.where(length > count, random_offset, offset)
        scale = tf.cast(length, tf.float32) / tf.cast(tf.maximum(count, 1), tf.float32)
        return rows, tf.gather(starts, rows) + offset, scale, lengths

    def _sum(self, rows: tf.Tensor, at: tf.Tensor, weights: tf.Tensor, row_count: tf.Tensor) -> tf.Tensor:
        """Sum of the weighted history rows at values positions `at`, per row.

        Summed as a sparse [rows x movies] matrix times the embedding table: the table's gradient
        is then one dense matrix instead of a slice per rated movie, which the optimizer would have
        to merge (that cost about half a history tower's training step).
        """
        table = self.history_embedding.embeddings
        indices = tf.stack([rows, tf.gather(self.rated_positions.values, at)], axis=1)
        shape = tf.stack([tf.cast(row_count, tf.int64), tf.shape(table, out_type=tf.int64)[0]])
        rated = tf.SparseTensor(indices, weights, shape)
        if not self.with_stars:
            return tf.sparse.sparse_dense_matmul(rated, table)
        liked = tf.SparseTensor(indices, weights * tf.gather(self.star_weights.values, at), shape)
        return (tf.sparse.sparse_dense_matmul(rated, table[:, :self.dim])
                + tf.sparse.sparse_dense_matmul(liked, table[:, self.dim:]))

    def _history_sums(self, unique_users: tf.Tensor, cap: int = 0) -> tuple[tf.Tensor, tf.Tensor]:
        """Each distinct user's history summed (estimated from at most `cap` entries each), and its length."""
        rows, at, scale, lengths = self._entries(unique_users, cap)
        return self._sum(rows, at, scale, tf.shape(unique_users)[0]), lengths

    def _subsampled_sums(self, users: tf.Tensor, leave_out_items: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Per example: its user's history without the left-out movie, each other movie kept with
        probability `history_keep`, summed; and how many were kept (both estimated from at most
        `history_sample` entries per example)."""
        rows, at, scale, _ = self._entries(users, self.history_sample)
        positions = tf.gather(self.rated_positions.values, at)
        keep = ((tf.random.uniform(tf.shape(positions)) < self.history_keep)
                & (positions != tf.gather(self.item_lookup(leave_out_items), rows)))
        rows, at, scale = tf.boolean_mask(rows, keep), tf.boolean_mask(at, keep), tf.boolean_mask(scale, keep)
        count = tf.math.unsorted_segment_sum(scale, rows, tf.shape(users)[0])
        return self._sum(rows, at, scale, tf.shape(users)[0]), count

    def call(self, inputs, training=None) -> tf.Tensor:
        """`inputs`: user ids, or {"user_id", "leave_out_item_id"[, "leave_out_stars"]} while training.

        A left-out movie must be in the user's history, as every training row is; with
        `stars`, its stars must be given too. While training, `id_dropout` of the examples see
        the out-of-vocabulary id row in place of their own, as a user known only by interactions
        would; with `history_keep` < 1, those examples also see only part of their history.
        """
        leave_out = None
        if isinstance(inputs, dict):
            inputs, leave_out = inputs["user_id"], inputs
        users = self.user_lookup(inputs)
        # Sum each distinct user's history once, however many rows of the batch they have.
        unique_users, row_of_example = tf.unique(users, out_idx=tf.int64)
        summed, lengths = self._history_sums(unique_users, self.history_sample if leave_out is not None else 0)
        summed = tf.gather(summed, row_of_example)
        count = tf.cast(tf.gather(lengths, row_of_example), tf.float32)
        if leave_out is not None:
            own = self.history_embedding(self.item_lookup(leave_out["leave_out_item_id"]))
            if self.with_stars:
                own = self._weighted(own, tf.cast(leave_out["leave_out_stars"], tf.float32) - self.mean_stars)
            summed -= own
            count -= 1.0
        id_rows = users
        if training and self.id_dropout:
            dropped = tf.random.uniform(tf.shape(users)) < self.id_dropout
            id_rows = tf.where(dropped, tf.zeros_like(users), users)
            if self.history_keep < 1.0 and leave_out is not None:
                at = tf.where(dropped)
                partial, kept = self._subsampled_sums(tf.gather_nd(users, at),
                                                      tf.gather_nd(leave_out["leave_out_item_id"], at))
                summed = tf.tensor_scatter_nd_update(summed, at, partial)
                count = tf.tensor_scatter_nd_update(count, at, kept)
        return self.user_embedding(id_rows) + summed / tf.sqrt(tf.maximum(count, 1.0))[:, None]


class ConcatTowers(tf.keras.Model):
    """Several independently trained towers as one: their outputs side by side.

    The dot product of two such towers is the sum of the members' dot products, so an
    ensemble of two-tower models is still one two-tower model with a wider embedding and
    serves through the same top-k over item embeddings.
    """

    def __init__(self, towers: list[tf.keras.Model], name: str):
        super().__init__(name=name)
        self.towers = towers

    def call(self, inputs, training=None) -> tf.Tensor:
        return tf.concat([tower(inputs, training=training) for tower in self.towers], axis=1)


def mean_over_global_batch(loss_sum: tf.Tensor, replica_batch_size: tf.Tensor) -> tf.Tensor:
    """A summed loss as a mean over the global batch: under tf.distribute every replica's
    gradients are summed, so each replica divides by the whole batch, not its share."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss_sum / tf.cast(replica_batch_size * replicas, loss_sum.dtype)


def catalog_logits(user_embeddings: tf.Tensor, item_model: tf.keras.Model, catalog_item_ids: tf.Tensor) -> tf.Tensor:
    """Dot-product logits of each user against every movie in the catalog."""
    return tf.matmul(user_embeddings, item_model(catalog_item_ids), transpose_b=True)


class CatalogSoftmax(tf.keras.layers.Layer):
    """Summed softmax cross-entropy over the whole catalog, each ensemble member on its own.

    Members share batches but not parameters or loss terms, so each trains as it would alone;
    their summed logits, what the concatenated towers serve, are the ensemble's score.
    """

    def __init__(self, item_ids: list[str], **kwargs):
        super().__init__(**kwargs)
        self.catalog_item_ids = tf.constant(item_ids)
        self.catalog_position = tf.keras.layers.StringLookup(vocabulary=item_ids, mask_token=None, num_oov_indices=0)
        self.loss = tf.keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.SUM)

    def call(self, user_members: list[tf.Tensor], item_models: list[tf.keras.Model], item_id: tf.Tensor) -> tf.Tensor:
        labels = self.catalog_position(item_id)
        return tf.add_n([self.loss(labels, catalog_logits(users, items, self.catalog_item_ids))
                         for users, items in zip(user_members, item_models)])


class SampledSoftmax(tf.keras.layers.Layer):
    """Summed softmax cross-entropy over the batch's own movies (in-batch negatives), each ensemble
    member on its own, with the sampling-bias (logQ) correction of Yi et al. 2019.

    A movie appears as a negative as often as it appears in the data, so popular movies would be
    pushed down far more than a softmax over the catalog pushes them: each logit is lowered by the
    log of its movie's share of the fit rows, which makes the sampled loss estimate the full one.
    The same movie elsewhere in the batch is not a negative (an accidental hit). What is computed per
    batch grows with the batch, not with the catalog.
    """

    def __init__(self, item_ids: list[str], item_counts: dict[str, int], **kwargs):
        super().__init__(**kwargs)
        self.catalog_position = tf.keras.layers.StringLookup(vocabulary=item_ids, mask_token=None, num_oov_indices=0)
        counts = np.array([item_counts.get(item_id, 0) for item_id in item_ids], np.float64) + 1.0
        self.log_probability = tf.constant(np.log(counts / counts.sum()).astype(np.float32))

    def logits(self, users: tf.Tensor, items: tf.Tensor, positions: tf.Tensor) -> tf.Tensor:
        """[batch, batch] corrected logits: row i's user against every example's movie."""
        logits = tf.matmul(users, items, transpose_b=True) - tf.gather(self.log_probability, positions)[None, :]
        same = tf.equal(positions[:, None], positions[None, :])
        accidental = same & ~tf.cast(tf.eye(tf.shape(positions)[0]), tf.bool)
        return tf.where(accidental, tf.fill(tf.shape(logits), -1e9), logits)

    def call(self, user_members: list[tf.Tensor], item_models: list[tf.keras.Model], item_id: tf.Tensor) -> tf.Tensor:
        positions = self.catalog_position(item_id)
        labels = tf.range(tf.shape(positions)[0])
        return tf.add_n([tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels, self.logits(users, items(item_id), positions))) for users, items in zip(user_members, item_models)])


def catalog_loss(loss_kind: str, item_ids: list[str], item_counts: dict[str, int] | None) -> tf.keras.layers.Layer:
    """The softmax a two-tower head trains with: over every movie ("full_softmax") or the batch's
    movies with the logQ correction ("sampled")."""
    if loss_kind == "sampled":
        return SampledSoftmax(item_ids, item_counts or {})
    return CatalogSoftmax(item_ids)


class RetrievalModel(tfrs.Model):
    """Two towers whose dot product scores (user, movie).

    `full_softmax` trains against every movie in the catalog (1,682 is cheap to
    score), `sampled` against the batch's movies with the logQ correction (`SampledSoftmax`:
    what grows with the batch, not the catalog), `in_batch` is the TFRS tutorial's in-batch
    softmax without it. With
    `preset.ensemble_size` > 1, that many tower pairs train side by side from
    different initialisations: `user_model` / `item_model` concatenate them all (the
    ranker's copy, whose cost grows only with the candidates), `index_user_model` /
    `index_item_model` are the first pair alone (the top-k index, whose cost grows
    with the catalog times the embedding width).
    """

    def __init__(self, user_ids: list[str], item_ids: list[str], history: dict[str, list[str]], preset: Preset,
                 item_counts: dict[str, int] | None = None):
        """`item_counts`: movie -> its fit rows (the `sampled` loss's sampling probabilities)."""
        super().__init__()
        self.loss_kind = preset.retrieval_loss
        self.uses_history = preset.user_history
        user_members, item_members = [], []
        for member in range(preset.ensemble_size):
            if preset.user_history:
                user_members.append(HistoryUserTower(user_ids, item_ids, history, preset.embedding_dim,
                                                     preset.retrieval_l2, name=f"history_user_tower_{member}",
                                                     id_dropout=preset.id_dropout, history_keep=preset.history_keep,
                                                     history_sample=preset.history_sample))
            else:
                user_members.append(id_tower(user_ids, preset.embedding_dim, preset.retrieval_l2,
                                             f"user_tower_{member}", preset.id_dropout))
            item_members.append(id_tower(item_ids, preset.embedding_dim, preset.retrieval_l2, f"item_tower_{member}"))
        self.user_model = ConcatTowers(user_members, name="user_model")
        self.item_model = ConcatTowers(item_members, name="item_model")
        self.index_user_model, self.index_item_model = user_members[0], item_members[0]
        if self.loss_kind == "in_batch":
            self.task = tfrs.tasks.Retrieval()
        else:
            self.catalog_softmax = catalog_loss(self.loss_kind, item_ids, item_counts)

    def compute_loss(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        user_input = features["user_id"]
        if self.uses_history:
            user_input = {"user_id": features["user_id"], "leave_out_item_id": features["item_id"]}
        user_members = [tower(user_input, training=training) for tower in self.user_model.towers]
        if self.loss_kind == "in_batch":
            return tf.add_n([self.task(users, items(features["item_id"]), compute_metrics=False)
                             for users, items in zip(user_members, self.item_model.towers)])
        summed = self.catalog_softmax(user_members, self.item_model.towers, features["item_id"])
        return mean_over_global_batch(summed, tf.shape(features["item_id"])[0])


class RatingHead(tf.keras.Model):
    """Stars from an MLP over a user and a movie embedding.

    With history, the user embedding adds the user's rated movies and the movie embedding
    the users who rated it (SVD++'s implicit feedback, both ways); with `rating_taste`, both
    sums also weigh a second embedding by the stars given, so the head sees what the user
    liked and who liked the movie.
    """

    def __init__(self, user_ids: list[str], item_ids: list[str], preset: Preset, history: dict[str, list[str]],
                 stars: dict[str, np.ndarray], name: str):
        super().__init__(name=name)
        self.user_history, self.item_history = preset.rating_user_history, preset.rating_item_history
        taste = preset.rating_taste
        mean_stars = float(np.mean(np.concatenate(list(stars.values())))) if taste and stars else 0.0
        if self.user_history:
            self.user_model = HistoryUserTower(user_ids, item_ids, history, preset.embedding_dim, preset.rating_l2,
                                               name="history_user_tower", stars=stars if taste else None,
                                               mean_stars=mean_stars, id_dropout=preset.id_dropout,
                                               history_keep=preset.history_keep, history_sample=preset.history_sample)
        else:
            self.user_model = id_tower(user_ids, preset.embedding_dim, preset.rating_l2, "user_tower",
                                       preset.id_dropout)
        if self.item_history:
            raters: dict[str, list[str]] = {}
            rater_stars: dict[str, list[float]] = {}
            for user, items in history.items():
                for item in items:
                    raters.setdefault(item, []).append(user)
                if taste:
                    for item, user_stars in zip(items, stars[user].tolist()):
                        rater_stars.setdefault(item, []).append(user_stars)
            self.item_model = HistoryUserTower(
                item_ids, user_ids, raters, preset.embedding_dim, preset.rating_l2, name="history_item_tower",
                stars={item: np.asarray(values, np.float32) for item, values in rater_stars.items()} if taste else None,
                mean_stars=mean_stars, history_sample=preset.history_sample)
        else:
            self.item_model = id_tower(item_ids, preset.embedding_dim, preset.rating_l2, "item_tower")
        self.mlp = tf.keras.Sequential(
            [tf.keras.layers.Dense(units, activation="relu") for units in preset.ranking_layers]
            + [tf.keras.layers.Dense(1)],
            name="mlp",
        )

    def call(self, features: dict[str, tf.Tensor], leave_out_rated: bool = False, training=None) -> tf.Tensor:
        """Predicted stars, [batch, 1]. `leave_out_rated` (training): the example's movie is dropped
        from the user's history and the user from the movie's raters, as they will not be there
        for a pair to predict."""
        if self.user_history and leave_out_rated:
            user_embeddings = self.user_model({"user_id": features["user_id"], "leave_out_item_id": features["item_id"],
                                               "leave_out_stars": features["rating"]}, training=training)
        else:
            user_embeddings = self.user_model(features["user_id"], training=training)
        if self.item_history and leave_out_rated:
            item_embeddings = self.item_model({"user_id": features["item_id"], "leave_out_item_id": features["user_id"],
                                               "leave_out_stars": features["rating"]})
        else:
            item_embeddings = self.item_model(features["item_id"])
        return self.mlp(tf.concat([user_embeddings, item_embeddings], axis=1))


class RankingModel(tfrs.Model):
    """Two heads, each with its own user and movie towers.

    - rating: a `RatingHead` predicting the star rating (MSE), reported as `predicted_rating`;
    - watch (when `preset.watch_weight` > 0): the dot product of watch embeddings,
      trained as a softmax over the catalog ("which movie does this user rate next"),
      which is what the service orders by. Separate towers keep the rating loss from
      pulling the watch embeddings towards "well rated" instead of "watched".
    """

    def __init__(self, user_ids: list[str], item_ids: list[str], preset: Preset,
                 history: dict[str, list[str]] | None = None, stars: dict[str, np.ndarray] | None = None,
                 item_counts: dict[str, int] | None = None):
        """`history`: user -> movies rated in the fit rows; `stars`: user -> their stars, in the same order;
        `item_counts`: movie -> its fit rows (for a `sampled` watch softmax)."""
        super().__init__()
        self.watch_weight = preset.watch_weight
        self.rating = RatingHead(user_ids, item_ids, preset, history or {}, stars or {}, name="rating")
        self.rating_task = tfrs.tasks.Ranking(
            loss=tf.keras.losses.MeanSquaredError(reduction=tf.keras.losses.Reduction.SUM),
            metrics=[tf.keras.metrics.RootMeanSquaredError(name="rmse")],
        )
        self.watch_history = preset.watch_history
        if self.watch_weight:
            self.watch_user_model = ConcatTowers(
                [HistoryUserTower(user_ids, item_ids, history or {}, preset.embedding_dim, 0.0,
                                  name=f"watch_user_tower_{member}", id_dropout=preset.id_dropout,
                                  history_keep=preset.history_keep, history_sample=preset.history_sample)
                 if self.watch_history else
                 id_tower(user_ids, preset.embedding_dim, 0.0, f"watch_user_tower_{member}", preset.id_dropout)
                 for member in range(preset.ensemble_size)], name="watch_user_model")
            self.watch_item_model = ConcatTowers(
                [id_tower(item_ids, preset.embedding_dim, 0.0, f"watch_item_tower_{member}")
                 for member in range(preset.ensemble_size)], name="watch_item_model")
            self.catalog_softmax = catalog_loss(preset.watch_loss, item_ids, item_counts)

    def call(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
        """Predicted star rating, [batch, 1]."""
        return self.rating(features)

    def compute_loss(self, features: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        batch = tf.shape(features["rating"])[0]
        # Labels as [batch, 1] like the predictions, so the summed loss is per example.
        summed = self.rating_task(labels=features["rating"][:, None],
                                  predictions=self.rating(features, leave_out_rated=True, training=training))
        loss = mean_over_global_batch(summed, batch)
        if self.watch_weight:
            user_input = features["user_id"]
            if self.watch_history:
                user_input = {"user_id": features["user_id"], "leave_out_item_id": features["item_id"]}
            user_members = [tower(user_input, training=training) for tower in self.watch_user_model.towers]
            summed = self.catalog_softmax(user_members, self.watch_item_model.towers, features["item_id"])
            loss += self.watch_weight * mean_over_global_batch(summed, batch)
        return loss


def item_towers_by_member(ranking_model: "RankingModel", retrieval_model: "RetrievalModel",
                          item_ids: list[str]) -> np.ndarray:
    """The item towers' outputs side by side, each member scaled to unit length: cosine over the
    result averages the members' cosines (SimilarItems' space where no dense matrix fits)."""
    towers = list(retrieval_model.item_model.towers)
    if ranking_model.watch_weight:
        towers = list(ranking_model.watch_item_model.towers) + towers
    ids = tf.constant(item_ids)
    parts = [tower(ids).numpy() for tower in towers]
    return np.concatenate([part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12) for part in parts],
                          axis=1).astype(np.float32)


def make_optimizer(name: str, learning_rate: float, decay_steps: int = 0) -> tf.keras.optimizers.Optimizer:
    """With `decay_steps`, the rate follows a cosine from `learning_rate` to 0 over that many steps:
    training ends at a settled point instead of wherever the last full-rate steps left it."""
    optimizers = {"adagrad": tf.keras.optimizers.Adagrad, "adam": tf.keras.optimizers.Adam}
    schedule = tf.keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps) if decay_steps else learning_rate
    return optimizers[name](learning_rate=schedule)
