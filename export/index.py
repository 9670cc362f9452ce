"""The retrieval index: every movie scored against the user, the best k kept (brute force, stock ops only)."""
from __future__ import annotations

import tensorflow as tf


class BruteForceIndex(tf.Module):
    """Catalog embeddings [movies, dim]; a query is one user embedding per row.

    Like TFRS's BruteForce, but with a documented interface of its own: excluded catalog
    positions (a user's history) get a score of -inf before the top-k, which costs one
    scatter of those positions rather than k + E comparisons per user.
    """

    def __init__(self, item_embeddings: tf.Tensor, name: str | None = None):
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
