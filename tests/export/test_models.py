"""Model pieces on their own: what a training example may see, and how ensembles add up."""
import numpy as np
import tensorflow as tf

from recsys.export.models import ConcatTowers, HistoryUserTower, id_tower

USERS = ["1", "2", "3"]
ITEMS = ["10", "20", "30", "40"]
HISTORY = {"1": ["10", "20", "30"], "2": ["20"], "3": ["10", "40"]}
STARS = {"1": np.array([5.0, 1.0, 4.0], np.float32), "2": np.array([3.0], np.float32),
         "3": np.array([2.0, 5.0], np.float32)}


def _tower(history: dict, stars: dict) -> HistoryUserTower:
    tf.keras.utils.set_random_seed(7)
    tower = HistoryUserTower(USERS, ITEMS, history, dim=4, l2=0.0, stars=stars, mean_stars=3.5)
    tower(tf.constant(USERS))
    return tower


def test_leaving_out_a_rating_equals_a_history_without_it():
    """A training example must not see its own movie or its own stars through the history."""
    full = _tower(HISTORY, STARS)
    users, items = ["1", "1", "3", "2"], ["20", "10", "40", "20"]
    stars = [STARS["1"][1], STARS["1"][0], STARS["3"][1], STARS["2"][0]]
    left_out = full({"user_id": tf.constant(users), "leave_out_item_id": tf.constant(items),
                     "leave_out_stars": tf.constant(stars)}).numpy()
    for row, (user, item) in enumerate(zip(users, items)):
        keep = [n for n, rated in enumerate(HISTORY[user]) if rated != item]
        without = _tower({**HISTORY, user: [HISTORY[user][n] for n in keep]}, {**STARS, user: STARS[user][keep]})
        for layer in ("user_embedding", "history_embedding"):
            getattr(without, layer).set_weights(getattr(full, layer).get_weights())
        np.testing.assert_allclose(left_out[row], without(tf.constant([user])).numpy()[0], rtol=1e-5, atol=1e-6)


def test_the_tower_is_its_formula():
    """id embedding + (sum of rated [+ (stars - mean) x liked] rows) / sqrt(count); unknown users get their
    out-of-vocabulary embedding alone."""
    tower = _tower(HISTORY, STARS)
    users = ["3", "1", "unknown", "1"]
    user_rows = tower.user_embedding.get_weights()[0]
    table = tower.history_embedding.get_weights()[0]
    rated, liked = table[:, :4], table[:, 4:]
    for row, user in zip(tower(tf.constant(users)).numpy(), users):
        positions = [ITEMS.index(item) + 1 for item in HISTORY.get(user, [])]
        weights = STARS[user] - 3.5 if user in STARS else np.zeros(0, np.float32)
        history = rated[positions].sum(axis=0) + (liked[positions] * weights[:, None]).sum(axis=0)
        expected = user_rows[USERS.index(user) + 1 if user in USERS else 0] + history / np.sqrt(max(len(positions), 1))
        np.testing.assert_allclose(row, expected, rtol=1e-5, atol=1e-6)


def test_stars_change_the_user_embedding():
    liked = _tower(HISTORY, STARS)
    disliked = _tower(HISTORY, {user: 6.0 - stars for user, stars in STARS.items()})
    assert not np.allclose(liked(tf.constant(["1"])).numpy(), disliked(tf.constant(["1"])).numpy())


def test_concatenated_towers_score_the_sum_of_their_members():
    tf.keras.utils.set_random_seed(3)
    users = [id_tower(USERS, 4, 0.0, f"user_{n}") for n in range(3)]
    items = [id_tower(ITEMS, 4, 0.0, f"item_{n}") for n in range(3)]
    user_ids, item_ids = tf.constant(["1", "3", "unknown"]), tf.constant(["40", "10", "20"])
    concatenated = tf.reduce_sum(ConcatTowers(users, "users")(user_ids) * ConcatTowers(items, "items")(item_ids), axis=1)
    summed = sum(tf.reduce_sum(user(user_ids) * item(item_ids), axis=1) for user, item in zip(users, items))
    assert ConcatTowers(users, "users")(user_ids).shape == (3, 12)
    np.testing.assert_allclose(concatenated.numpy(), summed.numpy(), rtol=1e-5)


def test_id_dropout_serves_the_out_of_vocabulary_row_with_the_history_while_training():
    """A dropped example sees row 0 (the generic user) and its own history, less its own movie; with
    `history_keep`, part of that history (none at all, at the limit)."""
    items = ["20", "10", "40"]
    features = {"user_id": tf.constant(["1", "1", "3"]), "leave_out_item_id": tf.constant(items),
                "leave_out_stars": tf.constant([STARS["1"][1], STARS["1"][0], STARS["3"][1]])}
    tower = _tower(HISTORY, STARS)
    oov = tower.user_embedding.get_weights()[0][0]
    for keep in (1.0, 1e-9):
        dropping = HistoryUserTower(USERS, ITEMS, HISTORY, dim=4, l2=0.0, stars=STARS, mean_stars=3.5,
                                    id_dropout=0.999999, history_keep=keep)
        dropping(tf.constant(USERS))
        for layer in ("user_embedding", "history_embedding"):
            getattr(dropping, layer).set_weights(getattr(tower, layer).get_weights())
        trained = dropping(features, training=True).numpy()
        served = dropping(features).numpy()
        np.testing.assert_allclose(served, tower(features).numpy(), rtol=1e-6), "no dropout outside training"
        history_part = tower(features).numpy() - tower.user_embedding(tower.user_lookup(features["user_id"])).numpy()
        expected = oov + (history_part if keep == 1.0 else np.zeros_like(history_part))
        np.testing.assert_allclose(trained, expected, rtol=1e-5, atol=1e-6)


def test_id_dropout_in_an_id_tower_only_while_training():
    from recsys.export.models import IdDropout

    ids = tf.constant([1, 2, 3, 4], tf.int64)
    assert IdDropout(0.999999)(ids, training=True).numpy().tolist() == [0, 0, 0, 0]
    assert IdDropout(0.999999)(ids).numpy().tolist() == [1, 2, 3, 4]


def test_a_sampled_history_is_an_unbiased_estimate_of_the_whole_sum():
    """With `history_sample`, a training step sums at most that many entries of a long history, scaled so
    that on average it is the whole history's sum (less the left-out movie); short histories are exact.
    Each distinct user of a step draws once, so many users with one same history give many draws."""
    items = [str(n) for n in range(100, 140)]
    draws = 3000
    users = [f"u{n}" for n in range(draws)] + ["short"]
    history = {**{user: items for user in users[:draws]}, "short": items[:3]}
    ratings = np.linspace(1, 5, len(items)).astype(np.float32)
    stars = {**{user: ratings for user in users[:draws]}, "short": ratings[:3]}
    tf.keras.utils.set_random_seed(11)
    towers = [HistoryUserTower(users, items, history, dim=4, l2=0.0, stars=stars, mean_stars=3.0, history_sample=cap)
              for cap in (0, 4)]
    for tower in towers:
        tower(tf.constant(users[:1]))
    for layer in ("user_embedding", "history_embedding"):
        getattr(towers[1], layer).set_weights(getattr(towers[0], layer).get_weights())
    features = {"user_id": tf.constant(users), "leave_out_item_id": tf.constant(["120"] * draws + ["101"]),
                "leave_out_stars": tf.constant([float(ratings[20])] * draws + [float(ratings[1])])}
    whole, sampled = (tower(features).numpy() for tower in towers)
    ids = towers[0].user_embedding.get_weights()[0][1:len(users) + 1]
    assert np.std(sampled[:draws] - ids[:draws], axis=0).max() > 1e-3, "the long history is sampled, not summed whole"
    np.testing.assert_allclose((sampled - ids)[:draws].mean(axis=0), (whole - ids)[:draws].mean(axis=0), atol=0.01)
    np.testing.assert_allclose(sampled[draws], whole[draws], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(towers[1](tf.constant(users)).numpy(), towers[0](tf.constant(users)).numpy(), rtol=1e-6,
                               err_msg="serving sums the whole history")
