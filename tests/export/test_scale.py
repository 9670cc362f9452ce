"""Training at a real catalog's size, in small: the synthetic data's structure, string ids, the sparse
item-item pieces, the logQ correction and the choices made by the data's size."""
import numpy as np
import pytest
import scipy.sparse as sparse
import tensorflow as tf

from recsys.export.baselines import als_model, hit_rate, interaction_matrix, top_unseen
from recsys.export.data import DataFormatError, load_csv, load_movielens
from recsys.export.item_item import co_rating_factors, ease_weights
from recsys.export.models import SampledSoftmax
from recsys.export.presets import PRESETS
from recsys.export.scale import fit_to_data
from recsys.export.synth import MIN_RATINGS_PER_USER, generate, write


@pytest.fixture(scope="module")
def synthetic():
    return generate(1500, 600, 60_000, seed=3)


def test_the_generator_makes_what_it_was_asked_with_its_planted_shape(synthetic):
    counts = np.bincount(synthetic.users, minlength=1500)
    assert abs(len(synthetic.users) - 60_000) < 0.02 * 60_000
    assert counts.min() >= MIN_RATINGS_PER_USER and counts.max() > 5 * np.median(counts), "log-normal activity"
    pairs = synthetic.users * 600 + synthetic.items
    assert len(np.unique(pairs)) == len(pairs), "a user rates a movie once"
    popularity = np.sort(np.bincount(synthetic.items, minlength=600))[::-1]
    assert popularity[:60].sum() > 0.3 * popularity.sum(), "a popular head"
    assert set(np.unique(synthetic.stars).tolist()) <= {x / 2 for x in range(1, 11)}
    again = generate(1500, 600, 60_000, seed=3)
    np.testing.assert_array_equal(again.items, synthetic.items)


def _split(synthetic):
    order = np.random.default_rng(0).permutation(len(synthetic.users))
    rows = np.stack([synthetic.users, synthetic.items], axis=1)[order]
    cut = int(0.8 * len(rows))
    return rows[:cut], rows[cut:]


def test_tastes_are_learnable_ease_and_als_beat_popularity(synthetic):
    train, test = _split(synthetic)
    history = interaction_matrix(train, (1500, 600))
    users = np.unique(test[:, 0])
    popularity = np.asarray(history.sum(axis=0)).ravel()
    rates = {"popularity": hit_rate(top_unseen(lambda block: np.tile(popularity, (len(block), 1)), history, users, 10),
                                    users, test),
             "ease": hit_rate(top_unseen(lambda block: history[block] @ ease_weights(history, 400.0), history, users,
                                         10), users, test)}
    model = als_model(history, 32, 0.1, 4.0)
    rates["als"] = hit_rate(top_unseen(lambda block: model.user_factors[block] @ model.item_factors.T, history, users,
                                       10), users, test)
    assert rates["ease"] > 1.5 * rates["popularity"] and rates["als"] > 1.3 * rates["popularity"], rates


def test_liked_topics_get_more_stars(synthetic):
    """Ratings follow taste: a user's most rated topic gets more stars than their others."""
    topics = synthetic.item_topics[synthetic.items]
    favourite = {}
    for user in range(200):
        mine = topics[synthetic.users == user]
        favourite[user] = np.bincount(mine).argmax()
    chosen = synthetic.users < 200
    is_favourite = topics[chosen] == np.array([favourite[user] for user in synthetic.users[chosen]])
    stars = synthetic.stars[chosen]
    assert stars[is_favourite].mean() > stars[~is_favourite].mean() + 0.2


def test_string_ids_round_trip_through_the_csv_format(tmp_path):
    data = generate(300, 200, 9_000, seed=1)
    files = write(data, tmp_path / "csv", "csv")
    loaded = load_csv(files["ratings"], files["items"])
    assert len(loaded.ratings) == len(data.users)
    user_ids = loaded.names.user_ids(loaded.ratings[:, 0])
    assert all(user.startswith("user-") for user in user_ids[:50])
    assert loaded.names.users.tolist() == sorted(loaded.names.users.tolist()), "codes in id order"
    assert set(loaded.names.item_ids(loaded.ratings[:, 1])) <= set(loaded.items)
    ml = load_movielens(write(data, tmp_path / "ml", "ml-25m")["ratings"].parent, "ml-25m")
    assert len(ml.ratings) == len(data.users) and ml.names.user_ids(ml.ratings[:1, 0])[0].isdigit()


@pytest.mark.parametrize("line, message", [
    ("u1,sku-nope,4,1", "movie id 'sku-nope' is not in the items file"),
    ("," + "x,4,1", "user id '' is not 1 to 128 characters"),
    ("u" * 129 + ",a,4,1", "is not 1 to 128 characters"),
])
def test_a_bad_string_id_names_its_file_and_line(tmp_path, line, message):
    (tmp_path / "items.csv").write_text("item_id,title,genres\na,A title,Drama\nx,X,\n")
    (tmp_path / "ratings.csv").write_text(f"user_id,item_id,rating,timestamp\nu1,a,4,1\n{line}\n")
    with pytest.raises(DataFormatError, match=f"ratings.csv:3: .*{message}"):
        load_csv(tmp_path / "ratings.csv", tmp_path / "items.csv")


def test_ease_from_a_sparse_matrix_is_the_dense_closed_form():
    rng = np.random.default_rng(0)
    dense = (rng.random((120, 40)) < 0.2).astype(np.float64)
    weights = ease_weights(sparse.csr_matrix(dense), 10.0)
    gram = dense.T @ dense + 10.0 * np.eye(40)
    inverse = np.linalg.inv(gram)
    expected = np.eye(40) - inverse / np.diag(inverse)[None, :]
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(weights, expected, atol=1e-10)


def test_randomized_svd_factors_match_the_exact_ones(monkeypatch):
    rng = np.random.default_rng(1)
    # A low-rank co-rating structure: cosines between movies are what the factors must keep.
    taste = rng.random((400, 5)) ** 4
    matrix = sparse.csr_matrix((rng.random((400, 150)) < taste @ rng.random((5, 150)) * 0.5).astype(np.float64))
    exact, method = co_rating_factors(matrix, 8)
    assert method == "exact"
    monkeypatch.setattr("recsys.export.item_item.EXACT_SVD_MAX_CELLS", 0)
    randomized, method = co_rating_factors(matrix, 8)
    assert method == "randomized"

    def cosines(factors):
        unit = factors / np.linalg.norm(factors, axis=1, keepdims=True)
        return unit @ unit.T

    difference = np.abs(cosines(randomized) - cosines(exact))
    assert difference.mean() < 0.005 and difference.max() < 0.06


def test_sampled_softmax_lowers_each_logit_by_its_movies_log_share():
    layer = SampledSoftmax(["a", "b", "c"], {"a": 99, "b": 9, "c": 0})
    users = tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    items = tf.constant([[2.0, 0.0], [0.0, 3.0], [2.0, 0.0]])
    positions = tf.constant([0, 1, 0], tf.int64)
    logits = layer.logits(users, items, positions).numpy()
    share = np.array([100.0, 10.0, 1.0]) / 111.0
    raw = users.numpy() @ items.numpy().T
    expected = raw - np.log(share[[0, 1, 0]])[None, :]
    # Rows 0 and 2 share movie "a": each is not the other's negative (an accidental hit).
    expected[0, 2] = expected[2, 0] = -1e9
    np.testing.assert_allclose(logits, expected, rtol=1e-5)


def test_sampled_softmax_with_equal_shares_is_the_plain_in_batch_loss():
    layer = SampledSoftmax(["a", "b", "c", "d"], {"a": 5, "b": 5, "c": 5, "d": 5})
    rng = np.random.default_rng(0)
    users = tf.constant(rng.normal(size=(4, 3)), tf.float32)
    item_table = tf.constant(rng.normal(size=(4, 3)), tf.float32)
    ids = tf.constant(["a", "b", "c", "d"])

    def items(item_id):
        return tf.gather(item_table, tf.strings.to_hash_bucket_fast(item_id, 1) * 0 + tf.range(4, dtype=tf.int64))

    loss = layer([users], [items], ids).numpy()
    logits = users.numpy() @ item_table.numpy().T
    expected = -np.sum(np.diag(logits) - np.log(np.exp(logits).sum(axis=1)))
    assert abs(loss - expected) < 1e-4


def test_the_default_preset_keeps_its_choices_at_movielens_100k_size_and_scales_beyond():
    preset = PRESETS["default"]
    small, choices = fit_to_data(preset, 943, 1682, 80_000)
    assert (small.retrieval_loss, small.watch_loss) == ("full_softmax", "full_softmax")
    assert (small.retrieval_epochs, small.ranking_epochs, small.ensemble_size) == (9, 16, 3)
    assert small.ease_weight == preset.ease_weight and small.history_sample == 0
    large, choices = fit_to_data(preset, 160_000, 60_000, 20_000_000)
    assert (large.retrieval_loss, large.watch_loss) == ("sampled", "sampled")
    assert (large.retrieval_epochs, large.ranking_epochs, large.ensemble_size) == (1, 1, 1)
    assert large.ease_weight == 0 and "dense weights fit at most" in choices["ease_weight"]["reason"]
    assert large.history_sample > 0, "long histories are sampled per step"
    assert fit_to_data(preset, 70_000, 10_700, 8_000_000)[0].ease_weight == preset.ease_weight, \
        "EASE stays where its movies x movies weights fit, however many users"
    kept, choices = fit_to_data(preset, 160_000, 60_000, 20_000_000, frozenset({"ranking_epochs", "retrieval_loss"}))
    assert kept.ranking_epochs == 16 and "ranking_epochs" not in choices, "a field set with --set stays"
    assert kept.retrieval_loss == "sampled", "auto is resolved even when set"
