"""The retrieval index on its own: brute-force top-k with exclusions, and its save-and-restore."""
import numpy as np
import tensorflow as tf

from recsys.export.index import BruteForceIndex


def _index() -> tuple[BruteForceIndex, np.ndarray]:
    embeddings = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    return BruteForceIndex(tf.constant(embeddings)), embeddings


def test_top_k_is_the_best_dot_products_best_first():
    index, embeddings = _index()
    queries = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    scores, positions = index(tf.constant(queries), 7)
    expected = np.argsort(-(queries @ embeddings.T), axis=1)[:, :7]
    np.testing.assert_array_equal(positions.numpy(), expected)
    np.testing.assert_allclose(scores.numpy(), np.take_along_axis(queries @ embeddings.T, expected, axis=1), rtol=1e-5)


def test_excluded_positions_are_never_returned():
    index, embeddings = _index()
    queries = np.random.default_rng(2).normal(size=(2, 6)).astype(np.float32)
    best = np.argsort(-(queries @ embeddings.T), axis=1)
    excluded = tf.constant([[0, position] for position in best[0, :5].tolist() + [best[0, 0]]], tf.int64)
    _, positions = index(tf.constant(queries), 10, excluded)
    np.testing.assert_array_equal(positions.numpy()[0], best[0, 5:15])
    np.testing.assert_array_equal(positions.numpy()[1], best[1, :10])


def test_saved_and_restored_the_index_answers_the_same(tmp_path):
    index, _ = _index()
    module = tf.Module()
    module.index = index
    module.top = tf.function(lambda queries: index(queries, 4),
                             input_signature=[tf.TensorSpec([None, 6], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "index"))
    restored = tf.saved_model.load(str(tmp_path / "index"))
    queries = tf.constant(np.random.default_rng(3).normal(size=(2, 6)).astype(np.float32))
    for original, loaded in zip(index(queries, 4), restored.top(queries)):
        np.testing.assert_array_equal(original.numpy(), loaded.numpy())
