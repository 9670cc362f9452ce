"""Yardsticks computed on the same split: they are never part of the served system.

- popularity (export/evaluate.py), always;
- EASE (Steck 2019), where its dense movies x movies weights fit (at most EASE_MAX_MOVIES movies);
- ALS for implicit feedback (Hu, Koren and Volinsky 2008), implicit's AlternatingLeastSquares, the
  library most users would reach for, at any size.

Each picks its hyperparameters on the validation split carved out of train (the fold-in variants on
the validation users), scores a sample of at most TUNING_USERS users there, and is then fit on the
evaluated export's own training rows. Nothing builds a dense users x movies matrix: the interactions
are a sparse matrix, and scores are computed a block of users at a time.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import scipy.sparse as sparse

from recsys.export.data import MovieLens, fit_and_held_out, fold_in_and_targets
from recsys.export.item_item import EASE_MAX_MOVIES, ease_weights

EASE_LAMBDAS = (50.0, 100.0, 200.0, 400.0, 800.0, 1600.0)
# ALS: searched one coordinate at a time from the first value of each (alpha, then regularisation,
# then factors), each fit with ALS_ITERATIONS sweeps.
ALS_ALPHAS = (1.0, 4.0, 16.0)
ALS_REGULARIZATIONS = (0.01, 0.1, 1.0)
ALS_FACTORS = (64, 128)
ALS_ITERATIONS = 15
TUNING_USERS = 5_000
USER_BLOCK = 512

# (user codes) -> [users, movies] scores; seen movies are left out by the caller.
Scorer = Callable[[np.ndarray], np.ndarray]


def interaction_matrix(rows: np.ndarray, shape: tuple[int, int]) -> sparse.csr_matrix:
    """Binary [user codes x movie codes] of `rows`."""
    matrix = sparse.csr_matrix((np.ones(len(rows), np.float32), (rows[:, 0], rows[:, 1])), shape=shape)
    matrix.data[:] = 1.0  # a pair listed twice is still one interaction
    return matrix


def top_unseen(scorer: Scorer, seen: sparse.csr_matrix, users: np.ndarray, count: int,
               catalog: np.ndarray | None = None) -> np.ndarray:
    """[users, count] movie codes, best first, of movies not in the users' rows of `seen`; with
    `catalog` (a boolean per movie code), only codes it marks."""
    top = np.zeros((len(users), count), np.int64)
    for start in range(0, len(users), USER_BLOCK):
        block = users[start:start + USER_BLOCK]
        scores = np.asarray(scorer(block), dtype=np.float64)
        seen_rows = seen[block]
        scores[seen_rows.nonzero()] = -np.inf
        if catalog is not None:
            scores[:, ~catalog] = -np.inf
        best = np.argpartition(-scores, count, axis=1)[:, :count]
        order = np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1, kind="stable")
        top[start:start + len(block)] = np.take_along_axis(best, order, axis=1)
    return top


def hit_rate(top: np.ndarray, users: np.ndarray, held_out: np.ndarray, k: int = 10) -> float:
    """Share of held-out (user, movie) rows of `users` whose movie is in that user's top k."""
    row_of = {user: n for n, user in enumerate(users.tolist())}
    wanted = np.isin(held_out[:, 0], users)
    rows = np.array([row_of[user] for user in held_out[wanted, 0].tolist()], dtype=np.int64)
    if not len(rows):
        return 0.0
    return float(np.mean(np.any(top[rows, :k] == held_out[wanted, 1][:, None], axis=1)))


def _sample_users(rows: np.ndarray, count: int = TUNING_USERS) -> np.ndarray:
    users = np.unique(rows[:, 0])
    if len(users) <= count:
        return users
    return np.sort(np.random.default_rng(0).choice(users, count, replace=False))


def _shape(data: MovieLens) -> tuple[int, int]:
    return len(data.names.users), len(data.names.items)


def catalog_mask(data: MovieLens) -> np.ndarray:
    """Which movie codes name a catalog movie (MovieLens' numeric codes leave gaps)."""
    return np.isin(data.names.items, list(data.items))


def ease_fits(data: MovieLens) -> bool:
    return len(data.items) <= EASE_MAX_MOVIES


def _ease_scorer(history: sparse.csr_matrix, weights: np.ndarray) -> Scorer:
    return lambda users: history[users] @ weights


def als_model(interactions: sparse.csr_matrix, factors: int, regularization: float, alpha: float):
    """implicit's ALS, seeded; BLAS on one thread while it fits, as implicit asks (it runs its own threads)."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(factors=factors, regularization=regularization, alpha=alpha,
                                        iterations=ALS_ITERATIONS, random_state=0)
        model.fit(interactions, show_progress=False)
    return model


def _als_scorer(model) -> Scorer:
    return lambda users: model.user_factors[users] @ model.item_factors.T


def _fingerprint(data: MovieLens) -> str:
    """Cheap identity of a data set's ratings: tuning is cached per data set, not per export."""
    ratings = np.ascontiguousarray(data.ratings)
    return hashlib.sha1(ratings[::max(1, len(ratings) // 100_000)].tobytes()).hexdigest() + str(ratings.shape)


_TUNED: dict[tuple[str, str, str], dict] = {}


def _tuned(kind: str, protocol: str, data: MovieLens, search: Callable[[], dict]) -> dict:
    key = (kind, protocol, _fingerprint(data))
    if key not in _TUNED:
        _TUNED[key] = search()
    return _TUNED[key]


def _validation(data: MovieLens, protocol: str) -> tuple[sparse.csr_matrix, sparse.csr_matrix, np.ndarray, np.ndarray]:
    """(what the model is fit on, what each scored user has seen, the scored users, their targets) of
    the validation part: rows for the random protocol, users for fold-in."""
    if protocol == "fold-in":
        fit, held_out = fit_and_held_out(data.ratings, "users-validation")
        fold_in, targets = fold_in_and_targets(held_out)
        seen = interaction_matrix(fold_in, _shape(data))
        return interaction_matrix(fit, _shape(data)), seen, _sample_users(targets), targets
    fit, validation = fit_and_held_out(data.ratings, "validation")
    history = interaction_matrix(fit, _shape(data))
    return history, history, _sample_users(validation), validation


def _search_ease(data: MovieLens, protocol: str) -> dict:
    fit, seen, users, targets = _validation(data, protocol)
    catalog = catalog_mask(data)
    rates = {l2: hit_rate(top_unseen(_ease_scorer(seen, ease_weights(fit, l2)), seen, users, 10, catalog), users, targets)
             for l2 in EASE_LAMBDAS}
    return {"lambda": max(rates, key=rates.get)}


def _search_als(data: MovieLens, protocol: str) -> dict:
    """Coordinate search: alpha, then regularisation, then factors, each from the best so far."""
    fit, seen, users, targets = _validation(data, protocol)
    best = {"alpha": ALS_ALPHAS[0], "regularization": ALS_REGULARIZATIONS[0], "factors": ALS_FACTORS[0]}
    tried: dict[tuple, float] = {}
    for name, values in (("alpha", ALS_ALPHAS), ("regularization", ALS_REGULARIZATIONS), ("factors", ALS_FACTORS)):
        for value in values:
            candidate = {**best, name: value}
            key = tuple(sorted(candidate.items()))
            if key not in tried:
                model = als_model(fit, **candidate)
                scorer = _als_scorer(model) if protocol != "fold-in" else _als_fold_in_scorer(model, seen)
                tried[key] = hit_rate(top_unseen(scorer, seen, users, 10, catalog_mask(data)), users, targets)
        best = dict(max(tried, key=tried.get))
        best = {key: best[key] for key in ("alpha", "regularization", "factors")}
    return best


def _als_fold_in_scorer(model, seen: sparse.csr_matrix) -> Scorer:
    """Users outside training: their factors solved from the movies sent (implicit's recalculate_user)."""
    def scores(users: np.ndarray) -> np.ndarray:
        user_factors = model.recalculate_user(users, seen[users])
        return np.asarray(user_factors) @ model.item_factors.T
    return scores


def ease_lists(data: MovieLens, holdout: str, users: np.ndarray, count: int) -> tuple[np.ndarray, float] | None:
    """EASE's top-`count` movie codes for `users` (codes), fit on the export's training rows; None where
    the catalog is too large for dense weights."""
    if not ease_fits(data):
        return None
    l2 = _tuned("ease", "random", data, lambda: _search_ease(data, "random"))["lambda"]
    history = interaction_matrix(fit_and_held_out(data.ratings, holdout)[0], _shape(data))
    return top_unseen(_ease_scorer(history, ease_weights(history, l2)), history, users, count, catalog_mask(data)), l2


def ease_fold_in_lists(data: MovieLens, holdout: str, users: np.ndarray, count: int
                       ) -> tuple[np.ndarray, float] | None:
    """EASE folded in: weights fit on the training users, each held-out user scored as x_u . B from the
    movies sent for them (never listed)."""
    if not ease_fits(data):
        return None
    l2 = _tuned("ease", "fold-in", data, lambda: _search_ease(data, "fold-in"))["lambda"]
    fit, held_out = fit_and_held_out(data.ratings, holdout)
    sent = interaction_matrix(fold_in_and_targets(held_out)[0], _shape(data))
    weights = ease_weights(interaction_matrix(fit, _shape(data)), l2)
    return top_unseen(_ease_scorer(sent, weights), sent, users, count, catalog_mask(data)), l2


def als_lists(data: MovieLens, holdout: str, users: np.ndarray, count: int) -> tuple[np.ndarray, dict]:
    """ALS's top-`count` movie codes for `users`, fit on the export's training rows."""
    chosen = _tuned("als", "random", data, lambda: _search_als(data, "random"))
    history = interaction_matrix(fit_and_held_out(data.ratings, holdout)[0], _shape(data))
    return top_unseen(_als_scorer(als_model(history, **chosen)), history, users, count, catalog_mask(data)), chosen


def als_fold_in_lists(data: MovieLens, holdout: str, users: np.ndarray, count: int) -> tuple[np.ndarray, dict]:
    """ALS folded in: fit on the training users; a held-out user's factors solved from the movies sent."""
    chosen = _tuned("als", "fold-in", data, lambda: _search_als(data, "fold-in"))
    fit, held_out = fit_and_held_out(data.ratings, holdout)
    sent = interaction_matrix(fold_in_and_targets(held_out)[0], _shape(data))
    model = als_model(interaction_matrix(fit, _shape(data)), **chosen)
    return top_unseen(_als_fold_in_scorer(model, sent), sent, users, count, catalog_mask(data)), chosen
