"""The served graphs with interactions: a user's towers computed at request time over the merged history
equal the trained Keras towers applied to that history, and users without interactions get exactly
the trained outputs."""
import numpy as np
import pytest
import tensorflow as tf

from recsys.export.examples import from_rows
from recsys.export.item_item import ease_weights, history_matrix
from recsys.export.models import ConcatTowers, HistoryUserTower
from recsys.export.presets import PRESETS
from tests.export.test_savedmodel import user_side

KNOWN, UNKNOWN = "42", "someone-new"


@pytest.fixture(scope="module")
def fit(split):
    return from_rows(split[0])


@pytest.fixture(scope="module")
def loaded(models_dir):
    return (tf.saved_model.load(str(models_dir / "retrieval" / "1")),
            tf.saved_model.load(str(models_dir / "ranking" / "1")))


def _interactions(fit, user):
    """A re-rating of a movie in the user's training history, a rating-less re-watch of another, two new
    movies (one rated, one not) and a movie no model knows."""
    history = fit.rated_item_ids.get(user, [])
    unseen = [item for item in ("1", "2", "3", "4", "5", "6", "7", "8") if item not in history]
    return ([(history[0], 1.0), (history[1], 0.0)] if history else []) + [(unseen[0], 5.0), (unseen[1], 0.0),
                                                                            ("not-a-movie", 4.0)]


def merged_history(fit, user, interactions):
    """movie -> stars (None: no rating), the training history with the interactions applied."""
    merged = dict(zip(fit.rated_item_ids.get(user, []), fit.rated_stars.get(user, np.zeros(0)).tolist()))
    for item, stars in interactions:
        if item == "not-a-movie":
            continue
        if stars:
            merged[item] = stars
        else:
            merged.setdefault(item, None)
    return merged


def tower_on(tower, user, merged):
    """`tower` (as trained) over the history `merged` for `user`; an unknown user by its formula."""
    if isinstance(tower, ConcatTowers):
        return np.concatenate([tower_on(member, user, merged) for member in tower.towers], axis=1)
    if not isinstance(tower, HistoryUserTower):
        return tower(tf.constant([user])).numpy()
    users = tower.user_lookup.get_vocabulary()[1:]
    items = tower.item_lookup.get_vocabulary()[1:]
    stars = {user: np.asarray([tower.mean_stars if value is None else value for value in merged.values()], np.float32)}
    if user in users:
        copy = HistoryUserTower(users, items, {user: list(merged)}, tower.dim, 0.0,
                                stars=stars if tower.with_stars else None, mean_stars=tower.mean_stars)
        copy(tf.constant([user]))
        copy.user_embedding.set_weights(tower.user_embedding.get_weights())
        copy.history_embedding.set_weights(tower.history_embedding.get_weights())
        return copy(tf.constant([user])).numpy()
    table = tower.history_embedding.get_weights()[0]
    rows = [items.index(item) + 1 for item in merged]
    summed = table[rows, :tower.dim].sum(axis=0)
    if tower.with_stars:
        summed += (table[rows, tower.dim:] * (stars[user] - tower.mean_stars)[:, None]).sum(axis=0)
    return (tower.user_embedding.get_weights()[0][0] + summed / np.sqrt(len(rows)))[None, :]


@pytest.mark.parametrize("user", [KNOWN, UNKNOWN])
def test_retrieval_with_interactions_is_the_tower_over_the_merged_history(loaded, trained, fit, user):
    retrieval, _ = loaded
    model = trained[1].retrieval_model
    interactions = _interactions(fit, user)
    user_vector = tower_on(model.index_user_model, user, merged_history(fit, user, interactions))
    catalog = trained[1].retrieval.item_ids.numpy()
    scores = (user_vector @ model.index_item_model(tf.constant(catalog)).numpy().T)[0]
    served = retrieval.signatures["include_rated"](**user_side([user], interactions))
    top = np.sort(scores)[::-1][:served["scores"].shape[1]]
    np.testing.assert_allclose(served["scores"].numpy()[0], top, rtol=1e-4, atol=1e-4)


def item_item_scores(fit, movielens, preset, merged, items):
    """EASE fit in closed form to the training histories, summed over `merged` for `items`."""
    catalog = sorted(movielens.items, key=int)
    weights = ease_weights(history_matrix(fit.user_ids, catalog, fit.rated_item_ids), preset.ease_lambda)
    rows = [catalog.index(item) for item in merged]
    return np.array([weights[rows, catalog.index(item)].sum() for item in items])


@pytest.mark.parametrize("user", [KNOWN, UNKNOWN])
def test_ranking_with_interactions_is_the_towers_over_the_merged_history(loaded, trained, fit, movielens, user):
    _, ranking = loaded
    model, retrieval = trained[1].ranking_model, trained[1].retrieval_model
    preset = PRESETS["tiny"]
    interactions = _interactions(fit, user)
    merged = merged_history(fit, user, interactions)
    items = ["1", "50", "181", "300", "7"]
    item_ids = tf.constant(items)
    served = ranking.signatures["serving_default"](**user_side([user], interactions), item_ids=item_ids[None, :])
    user_vector = np.concatenate([tower_on(model.watch_user_model, user, merged),
                                  tower_on(retrieval.user_model, user, merged)], axis=1)
    item_vectors = np.concatenate([model.watch_item_model(item_ids).numpy(), retrieval.item_model(item_ids).numpy()],
                                  axis=1)
    weight = preset.ease_weight if user == KNOWN else preset.ease_weight_new_users
    expected = item_vectors @ user_vector[0] + weight * item_item_scores(fit, movielens, preset, merged, items)
    np.testing.assert_allclose(served["score"].numpy()[0], expected, rtol=1e-4, atol=1e-3)
    rating_user = np.repeat(tower_on(model.rating.user_model, user, merged), len(items), axis=0)
    predicted = model.rating.mlp(tf.concat([rating_user, model.rating.item_model(item_ids)], axis=1))[:, 0]
    np.testing.assert_allclose(served["predicted_rating"].numpy()[0], predicted.numpy(), rtol=1e-4, atol=1e-4)


def test_interactions_change_the_outputs_and_unknown_movies_change_nothing(loaded, fit):
    retrieval, ranking = loaded
    users = ["1", KNOWN, "943"]
    plain = retrieval.signatures["serving_default"](**user_side(users))
    ignored = retrieval.signatures["serving_default"](**user_side(users, [("not-a-movie", 5.0), ("", 0.0)]))
    for key in ("item_ids", "scores"):  # no known movie: exactly the trained outputs, bit for bit
        np.testing.assert_array_equal(plain[key].numpy(), ignored[key].numpy())
    moved = retrieval.signatures["serving_default"](**user_side(users, _interactions(fit, KNOWN)[:3]))
    assert not np.array_equal(plain["scores"].numpy(), moved["scores"].numpy())
    items = tf.constant([["1", "2", "3"]] * len(users))
    before = ranking.signatures["serving_default"](**user_side(users), item_ids=items)
    after = ranking.signatures["serving_default"](**user_side(users, [("not-a-movie", 5.0)]), item_ids=items)
    for key in ("score", "predicted_rating"):
        np.testing.assert_array_equal(before[key].numpy(), after[key].numpy())


def test_interacted_movies_are_never_candidates_unless_include_rated(loaded):
    retrieval, _ = loaded
    first = retrieval.signatures["include_rated"](**user_side([UNKNOWN], [("1", 5.0)]))["item_ids"].numpy()[0]
    interactions = [("1", 5.0)] + [(item, 0.0) for item in first[:3].astype(str)]
    sent = {item for item, _ in interactions}
    everything = retrieval.signatures["include_rated"](**user_side([UNKNOWN], interactions))["item_ids"].numpy()[0]
    served = retrieval.signatures["serving_default"](**user_side([UNKNOWN], interactions))["item_ids"].numpy()[0]
    everything, served = everything.astype(str).tolist(), served.astype(str).tolist()
    assert sent & set(everything), "the check needs some of the user's own movies among the candidates"
    assert not sent & set(served)
    remaining = [item for item in everything if item not in sent]
    assert served[:len(remaining)] == remaining, "the same scores, with the user's movies taken out"


def test_a_movie_sent_twice_counts_once(loaded):
    retrieval, _ = loaded
    once = retrieval.signatures["include_rated"](**user_side([UNKNOWN], [("1", 4.0), ("2", 0.0)]))
    twice = retrieval.signatures["include_rated"](**user_side([UNKNOWN], [("1", 4.0), ("2", 0.0), ("1", 4.0)]))
    np.testing.assert_allclose(once["scores"].numpy(), twice["scores"].numpy(), rtol=1e-6)
