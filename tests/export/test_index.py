"""The retrieval indexes on their own: brute force and partitioned, their top-k with exclusions, the
partition into cells, the probes, and their save-and-restore."""
import numpy as np
import pytest
import tensorflow as tf

from recsys.export.index import (
    BruteForceIndex,
    IndexSpec,
    PartitionedIndex,
    balanced_cells,
    kmeans,
    partition,
    recall,
)
from recsys.export.presets import PRESETS
from recsys.export.scale import RECALL_TARGET, TUNING_MARGIN, choose_index


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


def _clusters(count: int = 8, per_cluster: int = 30, dim: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points around `count` well-separated centres (planted cells), and each point's cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(count, dim)) * 10.0
    labels = np.repeat(np.arange(count), per_cluster)
    return (centres[labels] + rng.normal(size=(len(labels), dim)) * 0.1).astype(np.float32), labels


def test_balanced_cells_respect_the_capacity_and_place_every_point_once():
    points = np.random.default_rng(4).normal(size=(500, 5)).astype(np.float32)
    centroids = kmeans(points, 16, seed=0)
    cell_of = balanced_cells(points, centroids, capacity=35)
    assert cell_of.min() >= 0 and cell_of.max() < 16
    assert np.bincount(cell_of, minlength=16).max() <= 35
    with pytest.raises(ValueError, match="cannot hold"):
        balanced_cells(points, centroids, capacity=31)  # 16 x 31 < 500


def test_partition_finds_planted_clusters_and_lists_each_movie_once():
    points, labels = _clusters()
    cells = partition(points, 8, seed=1)
    members = cells.members
    real = members[members < len(points)]
    assert sorted(real.tolist()) == list(range(len(points))), "every movie in exactly one cell"
    assert (members[members >= len(points)] == len(points)).all(), "padding names no movie"
    for row in members:
        assert len(set(labels[row[row < len(points)]])) == 1, "a cell holds one planted cluster"


def test_a_capacity_splits_a_large_cluster_over_cells():
    points, labels = _clusters(count=2, per_cluster=60)
    points = np.concatenate([points, points[:60] + 0.01])  # cluster 0 now holds 120 of 180 movies
    members = partition(points, 6, seed=0).members
    sizes = (members < len(points)).sum(axis=1)
    assert sizes.max() <= 33, "at most 10% above the mean of 30"


def test_probing_every_cell_is_brute_force_and_exhaustive_agrees():
    embeddings = np.random.default_rng(5).normal(size=(300, 6)).astype(np.float32)
    queries = tf.constant(np.random.default_rng(6).normal(size=(4, 6)).astype(np.float32))
    brute = BruteForceIndex(tf.constant(embeddings))
    index = PartitionedIndex(embeddings, cells=10, probes=10)
    for (scores, positions), (exact_scores, exact_positions) in ((index(queries, 20), brute(queries, 20)),
                                                                 (index.exhaustive(queries, 20), brute(queries, 20))):
        np.testing.assert_array_equal(positions.numpy(), exact_positions.numpy())
        np.testing.assert_allclose(scores.numpy(), exact_scores.numpy(), rtol=1e-5)


def test_a_query_probes_its_best_cells_only():
    points, labels = _clusters()
    index = PartitionedIndex(points, cells=8, probes=1)
    # A query pointing at cluster 3's centre: its one probed cell is cluster 3's.
    query = points[labels == 3].mean(axis=0)
    scores, positions = index(tf.constant(query[None, :]), 10)
    assert set(labels[positions.numpy()[0]]) == {3}
    expected = np.argsort(-(points[labels == 3] @ query))[:10]
    np.testing.assert_array_equal(positions.numpy()[0], np.flatnonzero(labels == 3)[expected])


def test_excluded_movies_are_never_returned_by_the_partitioned_index():
    points, labels = _clusters()
    index = PartitionedIndex(points, cells=8, probes=2)
    queries = np.stack([points[labels == 3].mean(axis=0), points[labels == 5].mean(axis=0)])
    _, before = index(tf.constant(queries), 15)
    first = before.numpy()[0]
    excluded = tf.constant([[0, position] for position in first[:6].tolist() + [first[0]]], tf.int64)
    scores, positions = index(tf.constant(queries), 15, excluded)
    np.testing.assert_array_equal(positions.numpy()[0, :9], first[6:])
    np.testing.assert_array_equal(positions.numpy()[1], before.numpy()[1]), "another user's exclusions do not apply"
    assert not set(positions.numpy()[0].tolist()) & set(first[:6].tolist())
    assert np.isfinite(scores.numpy()).all()


def test_when_the_probed_cells_run_out_the_rest_scores_minus_infinity():
    points, labels = _clusters(count=4, per_cluster=10)
    index = PartitionedIndex(points, cells=4, probes=1)
    query = tf.constant(points[labels == 2].mean(axis=0)[None, :])
    excluded = tf.constant([[0, position] for position in np.flatnonzero(labels == 2)[:4]], tf.int64)
    scores, positions = index(query, index.cell_size, excluded)
    finite = np.isfinite(scores.numpy()[0])
    assert finite.sum() == 6, "the probed cell's 10 movies less the 4 excluded"
    assert set(positions.numpy()[0][finite]) == set(np.flatnonzero(labels == 2)[4:])
    assert (positions.numpy()[0] < len(points)).all(), "the -inf answers still name a movie of the catalog"
    with pytest.raises(ValueError, match="exceeds"):
        index(query, index.cell_size + 1)


def test_saved_and_restored_the_partitioned_index_answers_the_same(tmp_path):
    points, _ = _clusters()
    index = PartitionedIndex(points, cells=8, probes=3)
    module = tf.Module()
    module.index = index
    module.top = tf.function(lambda queries, excluded: index(queries, 12, excluded),
                             input_signature=[tf.TensorSpec([None, 6], tf.float32), tf.TensorSpec([None, 2], tf.int64)])
    tf.saved_model.save(module, str(tmp_path / "index"))
    restored = tf.saved_model.load(str(tmp_path / "index"))
    queries = tf.constant(points[::40])
    excluded = tf.constant([[0, 0], [1, 40]], tf.int64)
    for original, loaded in zip(index(queries, 12, excluded), restored.top(queries, excluded)):
        np.testing.assert_array_equal(original.numpy(), loaded.numpy())


def test_build_takes_the_fewest_probes_that_reach_the_recall_target():
    embeddings = np.random.default_rng(7).normal(size=(2_000, 8)).astype(np.float32)
    queries = np.random.default_rng(8).normal(size=(40, 8)).astype(np.float32)
    index, record = IndexSpec("partitioned", cells=32, probes=1, tune_to=0.9).build(embeddings, queries, k=20)
    assert record["recall"] >= 0.9 and record["probes"] == index.probes > 1
    assert record["recall"] == pytest.approx(recall(index, queries, 20))
    assert recall(PartitionedIndex(embeddings, 32, index.probes - 1), queries, 20) < 0.9, "one probe fewer falls short"
    started_high, _ = IndexSpec("partitioned", cells=32, probes=index.probes + 3, tune_to=0.9).build(
        embeddings, queries, k=20)
    assert started_high.probes == index.probes + 3, "never fewer probes than it starts from"
    fixed, record = IndexSpec("partitioned", cells=32, probes=2).build(embeddings, queries, k=20)
    assert fixed.probes == record["probes"] == 2, "probes given stay as given"


def test_the_faster_of_the_two_indexes_is_built_when_timed():
    rng = np.random.default_rng(9)
    # Unstructured movies, recall 0.99: nearly every cell probed, so the partitioned index gathers the
    # whole catalog for each query where brute force reads it once (about 8 times slower).
    spread = rng.normal(size=(10_000, 64)).astype(np.float32)
    spec = IndexSpec("partitioned", cells=32, probes=1, reason="10,000 movies", tune_to=0.99, timed_k=20)
    index, record = spec.build(spread, rng.normal(size=(48, 64)).astype(np.float32), k=20)
    assert isinstance(index, BruteForceIndex) and record["kind"] == "brute_force"
    assert record["partitioned_ms"] > record["brute_force_ms"] > 0 and record["timed_k"] == 20
    assert record["reason"].startswith("10,000 movies; recall") and "every movie scored instead" in record["reason"]
    # 100,000 movies in tight clusters, one of 256 cells probed: about 430 movies scored a query.
    centres = rng.normal(size=(256, 8)).astype(np.float32)
    clustered = centres[rng.integers(0, 256, 100_000)] + 0.05 * rng.normal(size=(100_000, 8)).astype(np.float32)
    kept, record = IndexSpec("partitioned", cells=256, probes=1, timed_k=20).build(clustered, centres[:48], k=20)
    assert isinstance(kept, PartitionedIndex) and record["kind"] == "partitioned"
    assert record["brute_force_ms"] > record["partitioned_ms"] > 0
    untimed, record = IndexSpec("partitioned", cells=32, probes=1, tune_to=0.99).build(spread, spread[:48], k=20)
    assert isinstance(untimed, PartitionedIndex) and "partitioned_ms" not in record, "forced, never timed"


def test_the_index_is_chosen_by_size_unless_set():
    tiny = PRESETS["tiny"]
    assert choose_index(tiny, 1_682, 40).kind == "brute_force"
    large = choose_index(tiny, 1_000_000, 200)
    assert (large.kind, large.cells) == ("partitioned", 2048)
    assert large.probes * 1_000_000 / large.cells >= 2 * 200 and large.tune_to == RECALL_TARGET + TUNING_MARGIN
    assert large.probes == 4, "the fewest probes that hold twice the k; export raises them for recall"
    assert large.timed_k == 200, "chosen by size, timed against brute force at export"
    forced = choose_index(tiny.with_overrides(["retrieval_index=partitioned", "index_cells=16", "index_probes=4"]), 500, 10)
    assert (forced.kind, forced.cells, forced.probes, forced.tune_to, forced.timed_k) == ("partitioned", 16, 4, 0.0, 0)
    assert choose_index(tiny.with_overrides(["retrieval_index=brute_force"]), 10**6, 200).kind == "brute_force"


def test_index_bench_prints_both_indexes_for_each_size(capsys):
    from recsys.export.__main__ import main as export_cli

    assert export_cli(["index-bench", "--movies", "3000"]) == 0
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(row[1].strip(), row[2].strip()) for row in rows] == [("3,000", "brute_force"), ("3,000", "partitioned")]
    assert float(rows[0][5]) == 1.0 and 0.0 < float(rows[1][5]) <= 1.0, "recall of each"
    assert export_cli(["index-bench", "--movies", "lots"]) == 2
    capsys.readouterr()
    assert export_cli(["index-bench", "--movies", "3000", "--unstructured"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4, "the header, then both indexes"


def test_exclusions_match_a_reference_in_every_probed_cell():
    """Random movies, queries and exclusions: the answer is the best of the probed cells' movies less the
    user's excluded ones, whichever probed cell (first or last) an excluded movie sits in."""
    rng = np.random.default_rng(3)
    points = rng.normal(size=(400, 8)).astype(np.float32)
    index = PartitionedIndex(points, cells=10, probes=3)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    excluded = np.array([[user, movie] for user in range(5) for movie in rng.choice(400, 60, replace=False)])
    scores, positions = index(tf.constant(queries), 20, tf.constant(excluded, tf.int64))
    cells = np.argsort(-(queries @ index.centroids.numpy().T), axis=1)[:, :3]
    members = index.cell_members.numpy()
    for user in range(5):
        probed = set(members[cells[user]].ravel().tolist()) - {len(points)}
        allowed = sorted(probed - set(excluded[excluded[:, 0] == user, 1].tolist()),
                         key=lambda movie: -float(points[movie] @ queries[user]))
        assert positions.numpy()[user].tolist() == allowed[:20]
        np.testing.assert_allclose(scores.numpy()[user], points[allowed[:20]] @ queries[user], rtol=1e-5)
