"""Yardsticks computed on the same split: they are never part of the served system."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from export.data import MovieLens, fit_and_held_out, fold_in_and_targets
from export.models import MAX_DENSE_CELLS, ease_weights

EASE_LAMBDAS = (50.0, 100.0, 200.0, 400.0, 800.0, 1600.0)
# EASE inverts an items x items matrix and scores a dense users x items one.
EASE_MAX_CELLS = MAX_DENSE_CELLS


def _interactions(rows: np.ndarray, user_index: dict[int, int], item_index: dict[int, int]) -> np.ndarray:
    matrix = np.zeros((len(user_index), len(item_index)), dtype=np.float64)
    matrix[[user_index[u] for u in rows[:, 0]], [item_index[i] for i in rows[:, 1]]] = 1.0
    return matrix


def ease_scores(interactions: np.ndarray, l2: float) -> np.ndarray:
    return interactions @ ease_weights(interactions, l2)


def _top_unseen(scores: np.ndarray, interactions: np.ndarray, count: int) -> np.ndarray:
    scores = np.where(interactions > 0, -np.inf, scores)
    top = np.argpartition(-scores, count, axis=1)[:, :count]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def _hit_rate(top: np.ndarray, held_out: np.ndarray, user_index, item_index, k: int) -> float:
    rows = np.array([user_index[u] for u in held_out[:, 0]])
    items = np.array([item_index[i] for i in held_out[:, 1]])
    return float(np.mean(np.any(top[rows, :k] == items[:, None], axis=1)))


def _indexes(ratings: np.ndarray) -> tuple[np.ndarray, dict[int, int], dict[int, int]]:
    """All item ids, and user / item id -> matrix row / column."""
    all_items = np.unique(ratings[:, 1])
    return (all_items, {u: n for n, u in enumerate(np.unique(ratings[:, 0]))},
            {i: n for n, i in enumerate(all_items)})


@lru_cache(maxsize=4)
def _choose_lambda(ratings_bytes: bytes, shape: tuple[int, int]) -> float:
    """Cached on the ratings' bytes: evaluating several exports of one data set tunes once."""
    ratings = np.frombuffer(ratings_bytes, dtype=np.int64).reshape(shape)
    fit, validation = fit_and_held_out(ratings, "validation")
    _, user_index, item_index = _indexes(ratings)
    interactions = _interactions(fit, user_index, item_index)
    hit_rates = {l2: _hit_rate(_top_unseen(ease_scores(interactions, l2), interactions, 10), validation,
                               user_index, item_index, 10) for l2 in EASE_LAMBDAS}
    return max(hit_rates, key=hit_rates.get)


def ease_lists(data: MovieLens, holdout: str, users: list[str],
               count: int) -> tuple[dict[str, list[str]], float] | None:
    """EASE top-`count` lists, lambda chosen on the validation split carved from train;
    None where the dense matrices would not fit (ML-20M and larger)."""
    ratings = np.ascontiguousarray(data.ratings)
    if len(np.unique(ratings[:, 0])) * len(np.unique(ratings[:, 1])) > EASE_MAX_CELLS:
        return None
    l2 = _choose_lambda(ratings.tobytes(), ratings.shape)
    fit, _ = fit_and_held_out(ratings, holdout)
    all_items, user_index, item_index = _indexes(ratings)
    interactions = _interactions(fit, user_index, item_index)
    top = _top_unseen(ease_scores(interactions, l2), interactions, count)
    return {user: [str(all_items[i]) for i in top[user_index[int(user)]]] for user in users}, l2


@lru_cache(maxsize=4)
def _choose_fold_in_lambda(ratings_bytes: bytes, shape: tuple[int, int]) -> float:
    """Lambda with the best fold-in HR@10 on the validation users (fit on the other training users)."""
    ratings = np.frombuffer(ratings_bytes, dtype=np.int64).reshape(shape)
    fit, held_out = fit_and_held_out(ratings, "users-validation")
    fold_in, targets = fold_in_and_targets(held_out)
    _, user_index, item_index = _indexes(ratings)
    train = _interactions(fit, user_index, item_index)
    sent = _interactions(fold_in, user_index, item_index)
    hit_rates = {l2: _hit_rate(_top_unseen(sent @ ease_weights(train, l2), sent, 10), targets, user_index,
                               item_index, 10) for l2 in EASE_LAMBDAS}
    return max(hit_rates, key=hit_rates.get)


def ease_fold_in_lists(data: MovieLens, holdout: str, count: int) -> tuple[dict[str, list[str]], float] | None:
    """EASE folded in: weights fit on the training users, each held-out user scored as x_u . B from the
    movies sent for them (never listed); lambda chosen on the validation users. None where too large."""
    ratings = np.ascontiguousarray(data.ratings)
    if len(np.unique(ratings[:, 0])) * len(np.unique(ratings[:, 1])) > EASE_MAX_CELLS:
        return None
    l2 = _choose_fold_in_lambda(ratings.tobytes(), ratings.shape)
    fit, held_out = fit_and_held_out(ratings, holdout)
    fold_in, _ = fold_in_and_targets(held_out)
    all_items, user_index, item_index = _indexes(ratings)
    sent = _interactions(fold_in, user_index, item_index)
    top = _top_unseen(sent @ ease_weights(_interactions(fit, user_index, item_index), l2), sent, count)
    return {str(user): [str(all_items[i]) for i in top[user_index[user]]] for user in np.unique(held_out[:, 0])}, l2
