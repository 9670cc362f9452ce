"""The served graphs: what the retrieval and ranking SavedModels compute for a request.

A user is an id plus a history. Every user tower of the trained models is
`id row + (sum of the history's rows [+ (stars - mean) x liked rows]) / sqrt(history length)`
(export/models.py `HistoryUserTower`), so the served graph can compute it for any history:
the user's training history merged with the interactions a request sends. Users who send
none get their tower's output as trained, read from a table (no history sums per request),
so their results are exactly the trained model's.

The ranker's score also sums an item-item part over the same history (EASE's weights B).

Signatures: retrieval `serving_default` (candidates, the history excluded), `include_rated`,
`similar_items` (a movie's nearest movies, also taking `item_id`), `rated_items` (each user's
training history, taking `user_id` alone: the popularity fill leaves it out); ranking `serving_default`
(scores of each user's `item_ids`) and `explain` (the history movies behind each score).
Every signature takes the same user-side inputs:
    user_id               string [users]          a user id; unknown ids get the out-of-vocabulary row
    interaction_item_ids  string [users, n]       recent movies, "" for padding; unknown movies are ignored
    interaction_ratings   float  [users, n]       their stars; 0 = no rating (watched or clicked)
A movie counts once per user: a rating sent with the request replaces the training one, and a
rating-less interaction leaves a known rating as it was.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.sparse as sparse
import tensorflow as tf

from recsys.export.index import RECALL_K, IndexSpec
from recsys.export.models import ConcatTowers, HistoryUserTower, RaggedTable, embedding_table
from recsys.server.layout import (
    INTERACTION_ITEMS_INPUT,
    INTERACTION_RATINGS_INPUT,
    ITEM_ID_INPUT,
    ITEM_IDS_INPUT,
    USER_ID_INPUT,
)
from recsys.server.limits import MAX_K

# Neighbours `similar_items` returns per movie (what SimilarItems may ask for), and reasons per movie.
SIMILAR_CANDIDATES = MAX_K
REASONS = 3

# A partitioned index's recall is measured (and its probes tuned) on this many queries at export.
TUNING_QUERIES = 500

OUT_OF_VOCABULARY_PROBE = "\x00out-of-vocabulary"
TABLE_CHUNK = 4096

USER_INPUTS = [tf.TensorSpec([None], tf.string, name=USER_ID_INPUT),
               tf.TensorSpec([None, None], tf.string, name=INTERACTION_ITEMS_INPUT),
               tf.TensorSpec([None, None], tf.float32, name=INTERACTION_RATINGS_INPUT)]


def tower_table(tower: tf.keras.Model, vocabulary: list[str]) -> np.ndarray:
    """The tower's output for every id of `vocabulary`, after a row 0 with its output for an
    unknown id: the same layout as a StringLookup over `vocabulary` with one OOV bucket."""
    ids = [OUT_OF_VOCABULARY_PROBE] + vocabulary
    return np.concatenate([tower(tf.constant(ids[start:start + TABLE_CHUNK])).numpy()
                           for start in range(0, len(ids), TABLE_CHUNK)])


@dataclass(frozen=True)
class TowerParts:
    """A user tower as the arrays of its formula, rows in lookup order (row 0: out of vocabulary).

    `rated` is None for an id-only tower (interactions do not move it); `liked` is None for a
    tower that does not weigh its history by stars.
    """

    ids: np.ndarray  # [users + 1, width]
    rated: np.ndarray | None  # [movies + 1, width]
    liked: np.ndarray | None  # [movies + 1, width]
    mean_stars: float = 0.0

    @staticmethod
    def of(tower: tf.keras.Model) -> "TowerParts":
        if isinstance(tower, ConcatTowers):
            members = [TowerParts.of(member) for member in tower.towers]
            if any(member.liked is not None for member in members):
                raise ValueError("concatenated towers that weigh stars are not supported")
            widths = [member.ids.shape[1] for member in members]
            movies = next((member.rated.shape[0] for member in members if member.rated is not None), None)
            rated = None if movies is None else np.concatenate(
                [member.rated if member.rated is not None else np.zeros((movies, width), np.float32)
                 for member, width in zip(members, widths)], axis=1)
            return TowerParts(np.concatenate([member.ids for member in members], axis=1), rated, None)
        if isinstance(tower, HistoryUserTower):
            table = tower.history_embedding.embeddings.numpy()
            ids = tower.user_embedding.embeddings.numpy()
            if tower.with_stars:
                return TowerParts(ids, table[:, :tower.dim], table[:, tower.dim:], tower.mean_stars)
            return TowerParts(ids, table, None)
        return TowerParts(embedding_table(tower), None, None)

    def times(self, kernel: np.ndarray) -> "TowerParts":
        """The parts of `tower(x) @ kernel`: the formula is linear in its rows."""
        return TowerParts(self.ids @ kernel, None if self.rated is None else self.rated @ kernel,
                          None if self.liked is None else self.liked @ kernel, self.mean_stars)

    def history_sums(self, history: "ServedHistory") -> np.ndarray | None:
        """Each user row's training history sum, before normalising (row 0, unknown users: zeros)."""
        if self.rated is None:
            return None
        # The histories as a sparse [users x movies] matrix (the ragged row splits are its CSR row
        # pointers) times the table: one sparse product instead of a scatter-add per rated movie.
        splits = history.positions.row_splits.numpy()
        positions, stars = history.positions.values.numpy(), history.stars.values.numpy()
        shape = (len(splits) - 1, self.rated.shape[0])
        summed = sparse.csr_matrix((np.ones(len(positions)), positions, splits), shape=shape) @ self.rated.astype(np.float64)
        if self.liked is not None:
            weights = (stars - self.mean_stars).astype(np.float64)
            summed += sparse.csr_matrix((weights, positions, splits), shape=shape) @ self.liked.astype(np.float64)
        return summed.astype(np.float32)


class Additions(NamedTuple):
    """What the interactions of a request add to the training histories of its users who sent any,
    one entry per (user, movie) sent: the tower sums are then the trained sums plus these, so a
    request costs what it sends, not what the user rated before."""

    active: tf.Tensor  # int64 [active users]: their rows in the request
    users: tf.Tensor  # int64 [active users]: their user lookup rows (0: unknown user)
    rows: tf.Tensor  # int64 [entries]: which active user (0..active users - 1)
    positions: tf.Tensor  # int64 [entries]: the movie's lookup row (1..movies)
    new: tf.Tensor  # bool [entries]: the movie is not in the user's training history
    stars: tf.Tensor  # float32 [entries]: the stars the entry counts with (a sent rating wins; else the trained one)
    old_stars: tf.Tensor  # float32 [entries]: the trained stars it replaces (0 for new movies)
    counts: tf.Tensor  # float32 [active users]: history length, training and new movies


class ServedHistory(tf.keras.layers.Layer):
    """Who rated what in training, per user row, and what a request's interactions add to it."""

    def __init__(self, user_ids: list[str], item_ids: list[str], rated_item_ids: dict[str, list[str]],
                 rated_stars: dict[str, np.ndarray], **kwargs):
        super().__init__(**kwargs)
        self.user_lookup = tf.keras.layers.StringLookup(vocabulary=user_ids, mask_token=None)
        # "" (padding) and unknown movies map to 0, which is never a history entry.
        self.item_lookup = tf.keras.layers.StringLookup(vocabulary=item_ids, mask_token=None)
        self.movie_count = len(item_ids)
        position = {item_id: index + 1 for index, item_id in enumerate(item_ids)}
        # Held as int32 (4 bytes a rating, not 8; served graphs read them as int64).
        self.positions = RaggedTable([[position[item] for item in rated_item_ids.get(user, [])] for user in user_ids],
                                     np.int32, name="positions")
        self.stars = RaggedTable([np.asarray(rated_stars.get(user, []), np.float32) for user in user_ids], np.float32,
                                 name="stars")

    def user_rows(self, user_id: tf.Tensor) -> tf.Tensor:
        return self.user_lookup(user_id)

    def training_positions(self, user_rows: tf.Tensor) -> tf.RaggedTensor:
        """Each user's training history as movie lookup rows. The row splits were checked when the
        table was built: checking them per request would add an Assert to the graph."""
        rows = self.positions.rows(user_rows, validate=False)
        return rows.with_values(tf.cast(rows.values, tf.int64))

    def trained_lengths(self, user_rows: tf.Tensor) -> tf.Tensor:
        """int64 [users]: how many movies each user row rated in training."""
        splits = self.positions.row_splits
        return tf.gather(splits, user_rows + 1) - tf.gather(splits, user_rows)

    def request_positions(self, interaction_item_ids: tf.Tensor) -> tf.Tensor:
        return self.item_lookup(interaction_item_ids)

    def additions(self, user_rows: tf.Tensor, positions: tf.Tensor, stars: tf.Tensor) -> Additions:
        """The interactions of the users with at least one known movie in them, a movie once: a rated
        entry before a rating-less one, else the first. A sent rating replaces the trained one; a
        rating-less entry of a trained movie changes nothing but still counts once."""
        active = tf.where(tf.reduce_any(positions > 0, axis=1))[:, 0]
        users = tf.gather(user_rows, active)
        positions, stars = tf.gather(positions, active), tf.gather(stars, active)
        rows = tf.broadcast_to(tf.range(tf.shape(positions, out_type=tf.int64)[0])[:, None],
                               tf.shape(positions, out_type=tf.int64))
        rated, unrated = (positions > 0) & (stars > 0), (positions > 0) & ~(stars > 0)
        rows = tf.concat([tf.boolean_mask(rows, rated), tf.boolean_mask(rows, unrated)], axis=0)
        sent = tf.concat([tf.boolean_mask(positions, rated), tf.boolean_mask(positions, unrated)], axis=0)
        sent_stars = tf.concat([tf.boolean_mask(stars, rated), tf.zeros_like(tf.boolean_mask(stars, unrated))], axis=0)
        width = tf.constant(self.movie_count + 1, tf.int64)
        keys, entry = tf.unique(rows * width + sent, out_idx=tf.int64)
        first = tf.math.unsorted_segment_min(tf.range(tf.size(sent, out_type=tf.int64)), entry,
                                             tf.size(keys, out_type=tf.int64))
        rows, sent, sent_stars = keys // width, keys % width, tf.gather(sent_stars, first)
        # Each entry against its user's training history: is the movie there, and with how many stars?
        trained = self.training_positions(users)
        trained_stars = self.stars.rows(users, validate=False).to_tensor()
        matches = tf.gather(trained.to_tensor(), rows) == sent[:, None]  # [entries, longest training history]
        new = ~tf.reduce_any(matches, axis=1)
        old_stars = tf.reduce_sum(tf.where(matches, tf.gather(trained_stars, rows), 0.0), axis=1)
        counts = (tf.cast(trained.row_lengths(), tf.float32)
                  + tf.math.unsorted_segment_sum(tf.cast(new, tf.float32), rows, tf.size(active)))
        return Additions(active, users, rows, sent, new, tf.where(sent_stars > 0, sent_stars, old_stars), old_stars,
                         counts)


class ServedUserTower(tf.keras.layers.Layer):
    """A user tower at serving time, as the tables of its formula: each user's id row, and for a
    tower over the history, each trained user's history sum. A user's output is the id row plus the
    sum over the square root of the history's length (HistoryUserTower), computed per request
    for the request's users: a table of every user's output would hold a third more per user for
    the cost of one gather. For users whose request sent interactions, the sum is the trained one
    plus what the interactions add or change."""

    def __init__(self, parts: TowerParts, history: ServedHistory, **kwargs):
        super().__init__(**kwargs)
        self.ids = tf.Variable(parts.ids, trainable=False, name="ids")
        self.history = history
        self.with_history = parts.rated is not None
        if self.with_history:
            self.trained_sums = tf.Variable(parts.history_sums(history), trainable=False, name="trained_sums")
            self.rated = tf.Variable(parts.rated, trainable=False, name="rated")
            self.with_stars = parts.liked is not None
            if self.with_stars:
                self.liked = tf.Variable(parts.liked, trainable=False, name="liked")
                self.mean_stars = parts.mean_stars

    def _weights(self, stars: tf.Tensor) -> tf.Tensor:
        return tf.where(stars > 0, stars - self.mean_stars, tf.zeros_like(stars))

    def added_sums(self, additions: Additions) -> tf.Tensor:
        """[active users, width]: what the interactions add to the trained history sums."""
        added = tf.gather(self.rated, additions.positions) * tf.cast(additions.new, tf.float32)[:, None]
        if self.with_stars:
            weights = self._weights(additions.stars) - self._weights(additions.old_stars)
            added += tf.gather(self.liked, additions.positions) * weights[:, None]
        return tf.math.unsorted_segment_sum(added, additions.rows, tf.size(additions.active))

    def _formula(self, user_rows: tf.Tensor, sums: tf.Tensor, counts: tf.Tensor) -> tf.Tensor:
        return tf.gather(self.ids, user_rows) + sums / tf.sqrt(tf.maximum(counts, 1.0))[:, None]

    def outputs_of(self, user_rows: tf.Tensor) -> tf.Tensor:
        """The trained output of each user row (no interactions)."""
        if not self.with_history:
            return tf.gather(self.ids, user_rows)
        return self._formula(user_rows, tf.gather(self.trained_sums, user_rows),
                             tf.cast(self.history.trained_lengths(user_rows), tf.float32))

    def call(self, user_rows: tf.Tensor, additions: Additions) -> tf.Tensor:
        trained = self.outputs_of(user_rows)
        if not self.with_history:
            return trained
        summed = tf.gather(self.trained_sums, additions.users) + self.added_sums(additions)
        return tf.tensor_scatter_nd_update(trained, additions.active[:, None],
                                           self._formula(additions.users, summed, additions.counts))


class LookupTower(tf.keras.layers.Layer):
    """Id -> a precomputed row (row 0 for unknown ids): a movie tower's output per movie."""

    def __init__(self, vocabulary: list[str], table: np.ndarray, **kwargs):
        super().__init__(**kwargs)
        self.lookup = tf.keras.layers.StringLookup(vocabulary=vocabulary, mask_token=None)
        self.table = tf.Variable(table, trainable=False, name="table")

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        return tf.gather(self.table, self.lookup(ids))


def _checked(user_id: tf.Tensor, interaction_item_ids: tf.Tensor, interaction_ratings: tf.Tensor):
    # A fed tensor bypasses the placeholder's shape: without these checks a scalar or [1, 1]
    # user_id reaches RaggedGather, whose CHECK aborts the whole TF Serving process
    # (tensorflow/tensorflow#85242). EnsureShape answers INVALID_ARGUMENT instead.
    return (tf.ensure_shape(user_id, [None]), tf.ensure_shape(interaction_item_ids, [None, None]),
            tf.ensure_shape(interaction_ratings, [None, None]))


def same_rows(user_id: tf.Tensor, rows: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`user_id` [users] and `rows` [users, n] as they are, or INVALID_ARGUMENT if the users differ."""
    both = tf.concat([user_id[:, None], rows], axis=1)
    return both[:, 0], both[:, 1:]


class RequestUsers:
    """One request's users as the towers see them: lookup rows and what their interactions add."""

    def __init__(self, history: ServedHistory, user_id: tf.Tensor, interaction_item_ids: tf.Tensor,
                 interaction_ratings: tf.Tensor):
        user_id, interaction_item_ids, interaction_ratings = _checked(user_id, interaction_item_ids,
                                                                      interaction_ratings)
        # One interaction row per user, one rating per movie, or INVALID_ARGUMENT (from ConcatV2 and
        # Reshape, which check at run time what an Assert op would check on every request).
        user_id, interaction_item_ids = same_rows(user_id, interaction_item_ids)
        interaction_ratings = tf.reshape(interaction_ratings, tf.shape(interaction_item_ids))
        self.rows = history.user_rows(user_id)
        # An interaction whose rating is not a number is ignored, like a movie the catalog does not know.
        self.request_positions = tf.where(tf.math.is_nan(interaction_ratings), tf.zeros([], tf.int64),
                                          history.request_positions(interaction_item_ids))
        self.request_stars = interaction_ratings
        self.history = history

    @functools.cached_property
    def additions(self) -> Additions:
        """What the users who sent interactions add to their histories: built only by the signatures that
        compute user towers, so the others carry none of its ops."""
        return self.history.additions(self.rows, self.request_positions, self.request_stars)

    def whole_histories(self) -> tf.Tensor:
        """Every user's history (not only of those who sent interactions): the training movies, then
        the request's known movies not among them, as [users, longest + 1] lookup rows, 0 where none.

        Built without the merge (no ranking by stars is needed here), at the cost of trusting the
        request to name each movie once, as the service's own requests do."""
        trained = self.history.training_positions(self.rows).to_tensor()
        sent = self.request_positions
        repeated = tf.reduce_any(sent[:, :, None] == trained[:, None, :], axis=2)
        sent = tf.where(repeated, tf.zeros_like(sent), sent)
        # At least one column, so that a user with no history still has a row to look at.
        return tf.pad(tf.concat([trained, sent], axis=1), [[0, 0], [0, 1]])


class RetrievalServing(tf.Module):
    """User -> the top `candidate_count` movie ids and scores of the retrieval index (export/index.py:
    brute force, or partitioned for a large catalog).

    `serving_default` never returns a movie of the user's history (training or request);
    `include_rated` skips that filter. With more history than the catalog can spare, the
    last candidates are excluded movies scored -inf, which the service drops.
    """

    def __init__(self, history: ServedHistory, user_tower: ServedUserTower, item_embeddings: tf.Tensor,
                 item_ids: list[str], candidate_count: int, similarity: np.ndarray,
                 index: IndexSpec = IndexSpec("brute_force"), similar_index: IndexSpec = IndexSpec("brute_force"),
                 seed: int = 0, tuning_queries: int = TUNING_QUERIES):
        """`similarity`: each catalog movie's vector (vocabulary order) in the space `similar_items`
        finds neighbours in, by cosine. `index` and `similar_index`: how each index is built; a
        partitioned one is checked (and tuned) on up to `tuning_queries` trained users or movies."""
        super().__init__()
        if candidate_count > len(item_ids):
            raise ValueError(f"candidate_count {candidate_count} exceeds the catalog ({len(item_ids)} movies)")
        self.candidate_count = candidate_count
        self.item_ids = tf.Variable(item_ids, dtype=tf.string, trainable=False, name="item_ids")
        self.history = history
        self.user_tower = user_tower
        rng = np.random.default_rng(seed)
        # Queries of trained users (rows 1..), computed for the sample alone.
        sample = rng.permutation(user_tower.ids.shape[0] - 1)[:tuning_queries] + 1
        self.index, built_index = index.build(
            item_embeddings, user_tower.outputs_of(tf.constant(sample, tf.int64)).numpy(),
            min(RECALL_K, candidate_count), seed, name="index")
        movies = history.movie_count
        self.similar_count = min(SIMILAR_CANDIDATES, movies - 1)
        self.movie_ids = tf.Variable([""] + item_ids[:movies], dtype=tf.string, trainable=False, name="movie_ids")
        unit = similarity / np.maximum(np.linalg.norm(similarity, axis=1, keepdims=True), 1e-12)
        unit = unit.astype(np.float32)
        self.neighbours, built_neighbours = similar_index.build(
            unit, unit[rng.permutation(len(unit))[:tuning_queries]], self.similar_count, seed, name="neighbours")
        self._index_records = {"retrieval": built_index, "similar_items": built_neighbours}
        # Row 0 (a movie the catalog does not know) is all zeros: no neighbours to speak of.
        self.unit_vectors = tf.Variable(np.vstack([np.zeros((1, unit.shape[1])), unit]).astype(np.float32),
                                        trainable=False, name="unit_vectors")

    def index_records(self) -> dict[str, dict]:
        """What each index is, why, and its measured recall: the metadata's `indexes`."""
        return {name: dict(record) for name, record in self._index_records.items()}

    def _candidates(self, users: RequestUsers, exclude_history: bool) -> dict[str, tf.Tensor]:
        excluded = None
        if exclude_history:
            # (user, catalog position) pairs; catalog positions are lookup rows - 1, since the index
            # lists the vocabulary's movies first.
            history = self.history.training_positions(users.rows)
            sent = tf.where(users.request_positions > 0)
            excluded = tf.concat([tf.stack([history.value_rowids(), history.values - 1], axis=1),
                                  tf.stack([sent[:, 0], tf.gather_nd(users.request_positions, sent) - 1], axis=1)],
                                 axis=0)
        scores, positions = self.index(self.user_tower(users.rows, users.additions), self.candidate_count, excluded)
        return {"item_ids": tf.gather(self.item_ids, positions), "scores": scores}

    @tf.function(input_signature=USER_INPUTS)
    def retrieve(self, user_id, interaction_item_ids, interaction_ratings) -> dict[str, tf.Tensor]:
        return self._candidates(RequestUsers(self.history, user_id, interaction_item_ids, interaction_ratings), True)

    @tf.function(input_signature=USER_INPUTS)
    def retrieve_including_rated(self, user_id, interaction_item_ids, interaction_ratings) -> dict[str, tf.Tensor]:
        return self._candidates(RequestUsers(self.history, user_id, interaction_item_ids, interaction_ratings), False)

    @tf.function(input_signature=USER_INPUTS[:1])
    def exhaustive_candidates(self, user_id) -> dict[str, tf.Tensor]:
        """The exact top `candidate_count` of each user's trained tower, nothing excluded: the reference
        `python -m recsys.export evaluate` measures the index's recall against. Not a signature:
        TF Serving never serves it."""
        rows = self.history.user_rows(tf.ensure_shape(user_id, [None]))
        scores, positions = self.index.exhaustive(self.user_tower.outputs_of(rows), self.candidate_count)
        return {"item_ids": tf.gather(self.item_ids, positions), "scores": scores}

    @tf.function(input_signature=USER_INPUTS[:1])
    def rated_items(self, user_id) -> dict[str, tf.Tensor]:
        """Each user's training history: movie ids [users, longest], "" for padding; none for ids
        the models do not know. The served graphs hold who rated what; the export's metadata does not."""
        positions = self.history.training_positions(self.history.user_rows(tf.ensure_shape(user_id, [None])))
        return {"item_ids": tf.gather(self.movie_ids, positions.to_tensor(0))}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=ITEM_ID_INPUT), *USER_INPUTS])
    def similar_items(self, item_id, user_id, interaction_item_ids, interaction_ratings) -> dict[str, tf.Tensor]:
        """Each movie's `similar_count` nearest movies by cosine, never itself nor a movie of the user's
        history ("" user ids have none beyond the interactions sent)."""
        item_id = tf.ensure_shape(item_id, [None])
        user_id, item_rows = same_rows(tf.ensure_shape(user_id, [None]), item_id[:, None])
        users = RequestUsers(self.history, user_id, interaction_item_ids, interaction_ratings)
        query = self.history.request_positions(item_rows[:, 0])
        history = tf.concat([users.whole_histories(), query[:, None]], axis=1)  # the movie itself too
        present = tf.where(history > 0)
        excluded = tf.stack([present[:, 0], tf.gather_nd(history, present) - 1], axis=1)
        scores, positions = self.neighbours(tf.gather(self.unit_vectors, query), self.similar_count, excluded)
        return {"item_ids": tf.gather(self.movie_ids, positions + 1), "scores": scores}


@dataclass(frozen=True)
class ItemItem:
    """The ranker's item-item part: EASE weights B [movies x movies] (vocabulary order); a candidate
    scores weight x sum over the user's history of B[movie, candidate]."""

    weights: np.ndarray
    weight: float
    weight_new_users: float


class RankingServing(tf.Module):
    """Each user's candidate movies -> predicted stars and the score the service orders by.

    With a watch head, `score` = the ranker's watch logit + the retrieval towers' dot
    product: two independently trained estimates of log p(movie | user) up to a
    per-user constant, so their sum orders each user's candidates like an ensemble.
    The retrieval towers are copied into this SavedModel frozen (training the ranker
    never touches them). Without a watch head, `score` is the rating. With an item-item
    part (`ItemItem`, EASE), the score adds its weighted sum over the user's history.

    The two dot products are one dot product of concatenated [watch, retrieval] vectors, and
    the rating MLP's first layer W [user; movie] + b is split into a per-user and a per-movie
    part, so a candidate costs two gathers, an add and the remaining small layers.
    """

    def __init__(self, ranking_model: tf.keras.Model, history: ServedHistory,
                 item_ids: list[str], retrieval_user_model: tf.keras.Model | None = None,
                 retrieval_item_model: tf.keras.Model | None = None, item_item: ItemItem | None = None):
        super().__init__()
        self.history = history
        rating = ranking_model.rating
        first, *rest = rating.mlp.layers
        kernel, bias = first.kernel.numpy(), first.bias.numpy()
        rating_users = TowerParts.of(rating.user_model)
        user_width = rating_users.ids.shape[1]
        user_kernel, item_kernel = kernel[:user_width], kernel[user_width:]
        self.first_activation = first.activation
        self.rest = rest
        self.user_hidden = ServedUserTower(rating_users.times(user_kernel), history, name="user_hidden")
        self.item_hidden = LookupTower(item_ids, tower_table(rating.item_model, item_ids) @ item_kernel + bias,
                                       name="item_hidden")
        self.orders_by_watch = bool(ranking_model.watch_weight)
        if self.orders_by_watch:
            user_towers = ConcatTowers([ranking_model.watch_user_model, retrieval_user_model], name="score_users")
            self.user_vectors = ServedUserTower(TowerParts.of(user_towers), history, name="user_vectors")
            self.item_vectors = LookupTower(item_ids, np.concatenate(
                [tower_table(ranking_model.watch_item_model, item_ids), tower_table(retrieval_item_model, item_ids)],
                axis=1), name="item_vectors")
        self.movie_ids = tf.Variable([""] + item_ids, dtype=tf.string, trainable=False, name="movie_ids")
        self.with_item_item = item_item is not None
        if self.with_item_item:
            # B by candidate (row = candidate, column = history movie, both lookup rows), with a row and
            # a column 0 for movies the catalog does not know (all zeros), flattened: a 1-D gather of
            # (candidate, movie) entries costs about 70% of a gather_nd of the same pairs. Nothing per
            # user is stored: a request sums B over its users' histories.
            by_candidate = np.pad(item_item.weights.T, [[1, 0], [1, 0]]).astype(np.float32)
            self.item_item_stride = tf.constant(by_candidate.shape[1], tf.int64)
            self.item_item_by_candidate = tf.Variable(by_candidate.ravel(), trainable=False,
                                                      name="item_item_by_candidate")
            self.item_item_weight = tf.constant(item_item.weight, tf.float32)
            self.item_item_weight_new_users = tf.constant(item_item.weight_new_users, tf.float32)
            self.item_lookup = tf.keras.layers.StringLookup(vocabulary=item_ids, mask_token=None)

    def scores(self, users: RequestUsers, item_ids: tf.Tensor) -> dict[str, tf.Tensor]:
        """[users, candidates] predicted stars and scores of `item_ids` [users, candidates]."""
        hidden = self.first_activation(self.user_hidden(users.rows, users.additions)[:, None, :]
                                       + self.item_hidden(item_ids))
        for layer in self.rest:
            hidden = layer(hidden)
        predicted_rating = hidden[:, :, 0]
        if self.orders_by_watch:
            score = tf.einsum("ud,ucd->uc", self.user_vectors(users.rows, users.additions), self.item_vectors(item_ids))
        else:
            score = tf.identity(predicted_rating)
        if self.with_item_item:
            score += self.item_item_scores(users, self.item_lookup(item_ids))
        return {"predicted_rating": predicted_rating, "score": score}

    def item_item_scores(self, users: RequestUsers, candidates: tf.Tensor) -> tf.Tensor:
        """[users, candidates] weight x sum over the history of B[movie, candidate]: over each user's
        training movies, then the new movies their interactions add. Only the candidates' columns of B
        are read, history length x candidates per user."""
        trained = self.history.training_positions(users.rows)
        scores = self._summed_columns(candidates, trained.value_rowids(), trained.values, tf.shape(users.rows)[0])
        additions = users.additions
        added = self._summed_columns(tf.gather(candidates, additions.active), additions.rows, additions.positions,
                                     tf.size(additions.active), tf.cast(additions.new, tf.float32))
        scores = tf.tensor_scatter_nd_add(scores, additions.active[:, None], added)
        weight = tf.where(users.rows > 0, self.item_item_weight, self.item_item_weight_new_users)
        return weight[:, None] * scores

    def _summed_columns(self, candidates: tf.Tensor, rows: tf.Tensor, positions: tf.Tensor, row_count: tf.Tensor,
                        weights: tf.Tensor | None = None) -> tf.Tensor:
        """[row_count, candidates]: per row r, the sum over its entries (rows == r) of B[position, candidate]."""
        entry_candidates = tf.gather(candidates, rows)  # [entries, candidates]
        values = self._item_item_at(entry_candidates, positions[:, None])
        if weights is not None:
            values *= weights[:, None]
        return tf.math.unsorted_segment_sum(values, rows, row_count)

    def _item_item_at(self, candidates: tf.Tensor, movies: tf.Tensor) -> tf.Tensor:
        """B[movie, candidate] for lookup rows broadcast against each other."""
        return tf.gather(self.item_item_by_candidate, tf.cast(candidates, tf.int64) * self.item_item_stride
                         + tf.cast(movies, tf.int64))

    def reasons(self, users: RequestUsers, item_ids: tf.Tensor) -> dict[str, tf.Tensor]:
        """For each (user, movie): the REASONS movies of the user's history that add the most to the
        movie's score, largest first; "" where fewer raise it.

        The score's history part is a sum over the history, so each movie's share is exact: its
        row of the dot-product towers times the candidate's vector over sqrt(history length), plus
        the item-item weight B[movie, candidate]. One matrix product over the history per request.
        """
        history = users.whole_histories()  # [users, longest]
        shares = tf.zeros(tf.concat([tf.shape(item_ids), tf.shape(history)[1:]], axis=0))  # [users, movies, longest]
        if self.orders_by_watch:
            scale = tf.math.rsqrt(tf.maximum(tf.reduce_sum(tf.cast(history > 0, tf.float32), axis=1), 1.0))
            shares += tf.einsum("ukd,uhd->ukh", self.item_vectors(item_ids),
                                tf.gather(self.user_vectors.rated, history)) * scale[:, None, None]
        candidates = self.history.request_positions(item_ids)
        if self.with_item_item:
            weight = tf.where(users.rows > 0, self.item_item_weight, self.item_item_weight_new_users)
            shares += weight[:, None, None] * self._item_item_at(candidates[:, :, None], history[:, None, :])
        kept = (history[:, None, :] > 0) & (history[:, None, :] != candidates[:, :, None]) & (shares > 0)
        shares = tf.where(kept, shares, tf.fill(tf.shape(shares), float("-inf")))
        padding = tf.fill(tf.concat([tf.shape(item_ids), [REASONS]], axis=0), float("-inf"))
        top = tf.math.top_k(tf.concat([shares, padding], axis=2), k=REASONS)
        rows = tf.gather(history, tf.minimum(top.indices, tf.shape(history)[1] - 1), batch_dims=1)
        found = top.values > float("-inf")
        return {"because_item_ids": tf.where(found, tf.gather(self.movie_ids, tf.where(found, rows, 0)), ""),
                "because_scores": tf.where(found, top.values, 0.0)}

    @tf.function(input_signature=[USER_INPUTS[0], tf.TensorSpec([None, None], tf.string, name=ITEM_IDS_INPUT),
                                  *USER_INPUTS[1:]])
    def rank(self, user_id, item_ids, interaction_item_ids, interaction_ratings) -> dict[str, tf.Tensor]:
        item_ids = tf.ensure_shape(item_ids, [None, None])
        user_id, item_ids = same_rows(tf.ensure_shape(user_id, [None]), item_ids)  # a row of movies per user
        return self.scores(RequestUsers(self.history, user_id, interaction_item_ids, interaction_ratings), item_ids)

    @tf.function(input_signature=[USER_INPUTS[0], tf.TensorSpec([None, None], tf.string, name=ITEM_IDS_INPUT),
                                  *USER_INPUTS[1:]])
    def explain(self, user_id, item_ids, interaction_item_ids, interaction_ratings) -> dict[str, tf.Tensor]:
        item_ids = tf.ensure_shape(item_ids, [None, None])
        user_id, item_ids = same_rows(tf.ensure_shape(user_id, [None]), item_ids)
        return self.reasons(RequestUsers(self.history, user_id, interaction_item_ids, interaction_ratings), item_ids)
