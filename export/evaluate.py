"""Hit rate and NDCG under three protocols, scored through the server's own pipeline.

- random: the fixed row split; each test user's list excludes the movies they rated in train.
- fold-in (strong generalisation, Liang et al. 2018, Steck 2019): users held out of training
  entirely; 80% of each one's ratings are sent with the request as interactions, the rest are
  the targets. Needs an export trained with `--holdout users` (or `users-validation`).
- recent: the random split's test users; the earliest half of each one's test ratings (by
  timestamp) is sent as interactions and the list is scored on the rest, against the same
  requests without interactions, and against requests that send those movies as exclusions
  instead (a control: what knowing them is worth beyond not listing them again).

HR@k: the share of target (user, movie) pairs whose movie is in that user's top k. NDCG@10: per
user, DCG of the targets in the top 10 over the ideal DCG, averaged over users. Each comes with
its standard error over users (users are the independent units; a user's pairs are not).
"""
from __future__ import annotations

import functools
import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

from recsys.export.baselines import (
    als_fold_in_lists,
    als_lists,
    catalog_mask,
    ease_fold_in_lists,
    ease_lists,
    interaction_matrix,
)
from recsys.export.data import (
    USER_HOLDOUTS,
    IdNames,
    MovieLens,
    fit_and_held_out,
    fold_in_and_targets,
    group_rows,
    popularity_order,
)
from recsys.export.index import RECALL_K
from recsys.export.item_item import unit_columns
from recsys.server.backend import Backend, UserBatch
from recsys.server.catalog import CatalogStore
from recsys.server.errors import ModelsUnavailable
from recsys.server.in_process import InProcessBackend
from recsys.server.layout import metadata_path
from recsys.server.limits import MAX_BATCH_USERS, MAX_K
from recsys.server.pipeline import Pipeline, Recommendation
from recsys.server.validation import Query

LIST_LENGTH = 100
# Users scored per protocol: all of them up to this many, else a seeded sample.
EVALUATION_USERS = 10_000
EVALUATION_SEED = 11
# Movies whose 10 nearest are compared by genre (all of them up to this many, else a seeded sample).
GENRE_MOVIES = 2_000
# Item-to-item HR@10: the user's top-rated training movies whose neighbours are looked at, and how
# many neighbours similar_items lists per movie (MAX_K).
ANCHORS = 3
SIMILAR_LIST = MAX_K
# Display order of the systems each protocol scores.
SYSTEMS = ("popularity", "ease", "als", "retrieval", "two_stage_without_interactions", "two_stage_excluding_them",
           "two_stage")
LABELS = {"two_stage_without_interactions": "two_stage, no interactions",
          "two_stage_excluding_them": "two_stage, them excluded"}

Interactions = dict[str, tuple[tuple[str, float], ...]]


def hit_rate_curve(lists: dict[str, list[str]], held_out: dict[str, set[str]]) -> list[float]:
    """HR@k for k = 1..LIST_LENGTH."""
    hits_at = np.zeros(LIST_LENGTH)
    pairs = 0
    for user, movies in held_out.items():
        pairs += len(movies)
        for position, item in enumerate(lists.get(user, [])[:LIST_LENGTH]):
            if item in movies:
                hits_at[position] += 1
    return (np.cumsum(hits_at) / pairs).tolist()


def _ratio_standard_error(hits: np.ndarray, pairs: np.ndarray) -> float:
    """Standard error of sum(hits) / sum(pairs) over independent users (the ratio estimator's)."""
    users = len(pairs)
    if users < 2:
        return 0.0
    rate = hits.sum() / pairs.sum()
    return float(np.sqrt(np.sum((hits - rate * pairs) ** 2) * users / (users - 1)) / pairs.sum())


def ranking_metrics(lists: dict[str, list[str]], held_out: dict[str, set[str]]) -> dict[str, float]:
    """HR@10, HR@100, NDCG@10, each with its standard error over users (`*_se`)."""
    pairs = np.array([len(movies) for movies in held_out.values()], dtype=np.float64)
    result = {}
    for k in (10, 100):
        hits = np.array([sum(item in movies for item in lists.get(user, [])[:k]) for user, movies in held_out.items()],
                        dtype=np.float64)
        result[f"hr@{k}"] = float(hits.sum() / pairs.sum())
        result[f"hr@{k}_se"] = _ratio_standard_error(hits, pairs)
    ndcgs = []
    for user, movies in held_out.items():
        ranked = lists.get(user, [])
        dcg = sum(1.0 / np.log2(position + 2) for position, item in enumerate(ranked[:10]) if item in movies)
        ideal = sum(1.0 / np.log2(position + 2) for position in range(min(len(movies), 10)))
        ndcgs.append(dcg / ideal)
    result["ndcg@10"] = float(np.mean(ndcgs))
    result["ndcg@10_se"] = float(np.std(ndcgs, ddof=1) / np.sqrt(len(ndcgs))) if len(ndcgs) > 1 else 0.0
    return result


def sample_users(rows: np.ndarray) -> np.ndarray:
    """The user codes of `rows`, sorted; at most EVALUATION_USERS of them (a seeded sample) on data sets
    with more users: the standard errors say what the sample costs in precision."""
    users = np.unique(rows[:, 0])
    if len(users) <= EVALUATION_USERS:
        return users
    return np.sort(np.random.default_rng(EVALUATION_SEED).choice(users, EVALUATION_USERS, replace=False))


def rows_of(rows: np.ndarray, users: np.ndarray) -> np.ndarray:
    return rows[np.isin(rows[:, 0], users)]


def popularity_lists(train: np.ndarray, users: np.ndarray, names: IdNames, sent: Interactions | None = None
                     ) -> dict[str, list[str]]:
    """Each user's most popular unseen movies (rated in `train` or `sent`), in the served fallback's
    order (`popularity_order`)."""
    codes, counts = np.unique(train[:, 1], return_counts=True)
    popular = popularity_order(names.item_ids(codes), dict(zip(names.item_ids(codes), counts.tolist())))
    rated = defaultdict(set)
    mine = rows_of(train, users)
    for user, item in zip(names.user_ids(mine[:, 0]), names.item_ids(mine[:, 1])):
        rated[user].add(item)
    for user, pairs in (sent or {}).items():
        rated[user].update(item for item, _ in pairs)
    lists = {}
    for user in names.user_ids(users):
        unseen = (item for item in popular if item not in rated[user])
        lists[user] = [item for _, item in zip(range(LIST_LENGTH), unseen)]
    return lists


def held_out_by_user(test: np.ndarray, names: IdNames) -> dict[str, set[str]]:
    held_out = defaultdict(set)
    for user, item in zip(names.user_ids(test[:, 0]), names.item_ids(test[:, 1])):
        held_out[user].add(item)
    return dict(held_out)


def interactions_by_user(rows: np.ndarray, names: IdNames, rating_scale: float = 1.0) -> Interactions:
    """(movie, stars) per user, in row order."""
    sent = defaultdict(list)
    for user, item, units in zip(names.user_ids(rows[:, 0]), names.item_ids(rows[:, 1]), rows[:, 2].tolist()):
        sent[user].append((item, units * rating_scale))
    return {user: tuple(pairs) for user, pairs in sent.items()}


def code_lists(top: np.ndarray, users: np.ndarray, names: IdNames) -> dict[str, list[str]]:
    """A baseline's [users, k] movie codes as lists of ids per user id."""
    return dict(zip(names.user_ids(users), (names.item_ids(row) for row in top)))


def served(pipeline: Pipeline, users: list[str], k: int = LIST_LENGTH, sent: Interactions | None = None,
           excluded: dict[str, set[str]] | None = None) -> dict[str, list[Recommendation]]:
    """What the server answers: the pipeline it runs, with each user's interactions and exclusions."""
    answers = {}
    for start in range(0, len(users), MAX_BATCH_USERS):
        batch = users[start:start + MAX_BATCH_USERS]
        queries = [Query(user, k=k, recent_interactions=(sent or {}).get(user, ()),
                         exclude_item_ids=frozenset((excluded or {}).get(user, ()))) for user in batch]
        for user, result in zip(batch, pipeline.recommend(queries)):
            answers[user] = result.items
    return answers


def two_stage_lists(pipeline: Pipeline, users: list[str], k: int = LIST_LENGTH, sent: Interactions | None = None,
                    excluded: dict[str, set[str]] | None = None) -> dict[str, list[str]]:
    """The served lists' movie ids."""
    return {user: [item.item_id for item in items] for user, items in served(pipeline, users, k, sent, excluded).items()}


def retrieval_lists(backend: Backend, users: list[str], sent: Interactions | None = None) -> tuple[dict, str]:
    """Retrieval alone: its candidates in its order (the user's history excluded); and the model version."""
    lists, model_version = {}, ""
    for start in range(0, len(users), MAX_BATCH_USERS):
        batch = users[start:start + MAX_BATCH_USERS]
        candidates = backend.retrieve(UserBatch.of(batch, [(sent or {}).get(user, ()) for user in batch]),
                                      include_rated=False)
        model_version = candidates.model_version
        for user, row, scores in zip(batch, candidates.item_ids, candidates.scores):
            lists[user] = [item for item, score in zip(row.tolist(), scores.tolist()) if score != -np.inf][:LIST_LENGTH]
    return lists, model_version


def index_recall(backend: InProcessBackend, users: list[str], k: int = RECALL_K) -> dict | None:
    """The served retrieval index's recall@k against brute force, on `users`' trained towers (what it
    is asked for a known user who sends nothing); 1 for a brute-force index, by construction. None
    for an export without the exhaustive reference (`exhaustive_candidates`)."""
    retrieval = backend.current.saved_models[0]
    if not hasattr(retrieval, "exhaustive_candidates"):
        return None
    shares = []
    for start in range(0, len(users), MAX_BATCH_USERS):
        batch = users[start:start + MAX_BATCH_USERS]
        served = backend.retrieve(UserBatch.of(batch), include_rated=True)
        exact = retrieval.exhaustive_candidates(tf.constant(batch))["item_ids"].numpy().astype(str)[:, :k]
        for row, scores, reference in zip(served.item_ids, served.scores, exact):
            found = {item for item, score in zip(row[:k].tolist(), scores[:k].tolist()) if score != -np.inf}
            shares.append(len(found & set(reference.tolist())) / len(reference))
    return {"recall_at": int(exact.shape[1]) if shares else k, "recall": float(np.mean(shares)) if shares else 1.0,
            "users": len(shares)}


def rating_rmse(backend: Backend, model_version: str, targets: np.ndarray, stars: np.ndarray, names: IdNames,
                sent: Interactions | None = None) -> float:
    """RMSE of the ranker's predicted stars on `targets` rows, each user with their interactions."""
    by_user = defaultdict(list)
    for row, (user, item) in enumerate(zip(names.user_ids(targets[:, 0]), names.item_ids(targets[:, 1]))):
        by_user[user].append((row, item))
    predicted = np.zeros(len(targets), np.float32)
    users = list(by_user)
    for start in range(0, len(users), MAX_BATCH_USERS):
        batch = users[start:start + MAX_BATCH_USERS]
        width = max(len(by_user[user]) for user in batch)
        item_ids = np.full((len(batch), width), "", dtype=object)
        for position, user in enumerate(batch):
            item_ids[position, :len(by_user[user])] = [item for _, item in by_user[user]]
        ranked = backend.rank(UserBatch.of(batch, [(sent or {}).get(user, ()) for user in batch]), item_ids,
                              model_version)
        for position, user in enumerate(batch):
            for column, (row, _) in enumerate(by_user[user]):
                predicted[row] = ranked.predicted_rating[position, column]
    return float(np.sqrt(np.mean((predicted - stars) ** 2)))


def _result(lists: dict[str, dict[str, list[str]]], held_out: dict[str, set[str]]) -> dict:
    present = [system for system in SYSTEMS if system in lists]
    return {"systems": {system: ranking_metrics(lists[system], held_out) for system in present},
            "hr_curve": {system: hit_rate_curve(lists[system], held_out) for system in present},
            "users": len(held_out), "pairs": sum(len(movies) for movies in held_out.values())}


def top_rated(train: np.ndarray, names: IdNames, count: int = ANCHORS) -> dict[str, list[str]]:
    """Each user's `count` best-rated training movies (most stars, then most recent)."""
    ordered = train[np.lexsort((-train[:, 3], -train[:, 2], train[:, 0]))]
    anchors: dict[str, list[str]] = defaultdict(list)
    for user, item in zip(names.user_ids(ordered[:, 0]), names.item_ids(ordered[:, 1])):
        if len(anchors[user]) < count:
            anchors[user].append(item)
    return dict(anchors)


def item_to_item_hit_rate(neighbours: dict[tuple[str, str], list[str]], anchors: dict[str, list[str]],
                          held_out: dict[str, set[str]], k: int = 10) -> dict[str, float]:
    """The share of held-out pairs whose movie is among the k nearest of one of the user's anchors (their
    history left out), with its standard error over users."""
    hits = np.array([len(movies & {item for anchor in anchors[user] for item in neighbours[(user, anchor)][:k]})
                     for user, movies in held_out.items()], dtype=np.float64)
    pairs = np.array([len(movies) for movies in held_out.values()], dtype=np.float64)
    return {f"hr@{k}": float(hits.sum() / pairs.sum()), f"hr@{k}_se": _ratio_standard_error(hits, pairs)}


def genre_overlap(pairs: list[tuple[str, str]], catalog: dict) -> float:
    """Mean Jaccard overlap of the two movies' genres."""
    overlaps = [len(set(catalog[a].genres) & set(catalog[b].genres)) / max(1, len(set(catalog[a].genres)
                                                                                 | set(catalog[b].genres)))
                for a, b in pairs]
    return float(np.mean(overlaps)) if overlaps else 0.0


def evaluate_similar_items(backend: Backend, data: MovieLens, train: np.ndarray, test: np.ndarray,
                           users: np.ndarray) -> dict:
    """SimilarItems against item-kNN (cosine over co-ratings): how often a held-out movie is among the 10
    nearest to one of the user's top-rated training movies (their history left out), and how alike in
    genre each movie's 10 nearest are, against random pairs."""
    names = data.names
    anchors = top_rated(rows_of(train, users), names)
    held_out = held_out_by_user(rows_of(test, users), names)
    requests = [(user, anchor) for user in names.user_ids(users) if user in held_out and user in anchors
                for anchor in anchors[user]]
    movies = data.item_ids
    rng = np.random.default_rng(0)
    looked_at = movies if len(movies) <= GENRE_MOVIES else sorted(rng.choice(movies, GENRE_MOVIES, replace=False),
                                                                   key=movies.index)
    whole_catalog = [("", movie) for movie in looked_at]
    served_neighbours = served_similar(backend, requests + whole_catalog)
    knn = item_knn_neighbours(data, train, requests + whole_catalog)
    tested = {user: held_out[user] for user in {user for user, _ in requests}}
    random_pairs = [(a, b) for a, b in rng.choice(movies, size=(10 * len(looked_at), 2)).tolist() if a != b]

    def summary(neighbours: dict) -> dict:
        return {**item_to_item_hit_rate(neighbours, anchors, tested),
                "genre_overlap": genre_overlap([(movie, item) for movie in looked_at
                                                for item in neighbours[("", movie)][:10]], data.items)}

    return {"served": summary(served_neighbours), "item_knn": summary(knn),
            "random_pairs_genre_overlap": genre_overlap(random_pairs, data.items), "anchors_per_user": ANCHORS}


def served_similar(backend: Backend, requests: list[tuple[str, str]]) -> dict[tuple[str, str], list[str]]:
    """The retrieval model's similar_items for (user, movie) requests ("" for no user), nearest first."""
    neighbours = {}
    for start in range(0, len(requests), MAX_BATCH_USERS):
        batch = requests[start:start + MAX_BATCH_USERS]
        nearest = backend.similar(UserBatch.of([user for user, _ in batch]), [movie for _, movie in batch])
        for key, row, scores in zip(batch, nearest.item_ids, nearest.scores):
            neighbours[key] = [item for item, score in zip(row.tolist(), scores.tolist()) if score != -np.inf]
    return neighbours


def item_knn_neighbours(data: MovieLens, train: np.ndarray, requests: list[tuple[str, str]]) -> dict:
    """The baseline: each (user, movie)'s nearest movies by cosine over training co-ratings, the movie
    itself and the user's training movies left out (as many as the served list holds). The co-ratings
    are a sparse matrix; similarities are computed for a block of the wanted movies at a time."""
    names = data.names
    code = {item_id: n for n, item_id in enumerate(names.items.tolist())}
    unit = unit_columns(interaction_matrix(train, (len(names.users), len(names.items)))).tocsc()
    catalog = catalog_mask(data)
    requesting = {user for user, _ in requests if user}
    mine = train[np.isin(train[:, 0], [n for n, user in enumerate(names.users.tolist()) if user in requesting])]
    rated = defaultdict(set)
    for user, item in zip(names.user_ids(mine[:, 0]), names.item_ids(mine[:, 1])):
        rated[user].add(item)
    keep = min(int(catalog.sum()), SIMILAR_LIST + 1 + max((len(movies) for movies in rated.values()), default=0))
    wanted = sorted({movie for _, movie in requests}, key=code.get)
    ranked = {}
    for start in range(0, len(wanted), 512):
        block = wanted[start:start + 512]
        similarity = (unit[:, [code[movie] for movie in block]].T @ unit).toarray()  # [block, movie codes]
        similarity[:, ~catalog] = -np.inf
        for row, movie in enumerate(block):
            similarity[row, code[movie]] = -np.inf
            ranked[movie] = names.item_ids(_best(similarity[row], keep))
    return {(user, movie): [item for item in ranked[movie] if item not in rated[user]][:SIMILAR_LIST]
            for user, movie in requests}


def _best(scores: np.ndarray, count: int) -> np.ndarray:
    """The `count` best positions, best first, ties in position order (as a stable sort of all would)."""
    if count >= len(scores):
        return np.argsort(-scores, kind="stable")
    best = np.argpartition(-scores, count)[:count]
    return best[np.lexsort((best, -scores[best]))]


def evaluate_reasons(answers: dict[str, list[Recommendation]], train: np.ndarray, data: MovieLens) -> dict:
    """How often a recommendation's first reason is a movie the user rated 4 stars or more, against how
    often any movie of theirs is (each user weighted by their recommendations with a reason)."""
    names, stars, liked_share = data.names, {}, defaultdict(list)
    for user, item, rating in zip(names.user_ids(train[:, 0]), names.item_ids(train[:, 1]), data.stars(train).tolist()):
        stars[(user, item)] = rating
        liked_share[user].append(rating >= 4)
    first_liked, any_liked, explained, model_items = [], [], 0, 0
    for user, recommendations in answers.items():
        for item in recommendations[:10]:
            model_items += not item.fallback
            if item.because_item_ids:
                explained += 1
                first_liked.append(stars.get((user, item.because_item_ids[0]), 0) >= 4)
                any_liked.append(np.mean(liked_share[user]))
    return {"first_reason_rated_4_or_more": float(np.mean(first_liked)) if first_liked else 0.0,
            "any_history_movie_rated_4_or_more": float(np.mean(any_liked)) if any_liked else 0.0,
            "items_with_a_reason": explained / max(model_items, 1)}


def evaluate_random(backend: Backend, catalogs: CatalogStore, data: MovieLens, holdout: str,
                    item_to_item: bool = True) -> dict:
    names = data.names
    train, test = fit_and_held_out(data.ratings, holdout)
    codes = sample_users(test)
    test = rows_of(test, codes)
    held_out = held_out_by_user(test, names)
    users = names.user_ids(codes)
    retrieved, model_version = retrieval_lists(backend, users)
    answers = served(Pipeline(backend, catalogs), users)
    lists = {"popularity": popularity_lists(train, codes, names), "retrieval": retrieved,
             "two_stage": {user: [item.item_id for item in items] for user, items in answers.items()}}
    ease = ease_lists(data, holdout, codes, LIST_LENGTH)
    if ease is not None:
        lists["ease"] = code_lists(ease[0], codes, names)
    als = als_lists(data, holdout, codes, LIST_LENGTH)
    lists["als"] = code_lists(als[0], codes, names)
    result = _result(lists, held_out)
    if ease is not None:
        result["systems"]["ease"]["lambda"] = ease[1]
    result["systems"]["als"].update(als[1])
    result["ranking"] = {"rmse": rating_rmse(backend, model_version, test, data.stars(test), names)}
    recall = index_recall(backend, users)
    if recall is not None:
        result["retrieval_index"] = {**catalogs.get(model_version).retrieval_index, "test_users": recall}
    if item_to_item:
        result["similar_items"] = evaluate_similar_items(backend, data, train, test, codes)
        result["reasons"] = evaluate_reasons(answers, rows_of(train, codes), data)
    return {"model_version": model_version, **result}


def evaluate_fold_in(backend: Backend, catalogs: CatalogStore, data: MovieLens, holdout: str) -> dict:
    names = data.names
    train, held = fit_and_held_out(data.ratings, holdout)
    held = rows_of(held, sample_users(held))
    fold_in, targets = fold_in_and_targets(held)
    sent = interactions_by_user(fold_in, names, data.rating_scale)
    held_out = held_out_by_user(targets, names)
    codes = np.unique(targets[:, 0])
    users = names.user_ids(codes)
    retrieved, model_version = retrieval_lists(backend, users, sent)
    lists = {"popularity": popularity_lists(train, codes, names, sent), "retrieval": retrieved,
             "two_stage": two_stage_lists(Pipeline(backend, catalogs), users, sent=sent)}
    ease = ease_fold_in_lists(data, holdout, codes, LIST_LENGTH)
    if ease is not None:
        lists["ease"] = code_lists(ease[0], codes, names)
    als = als_fold_in_lists(data, holdout, codes, LIST_LENGTH)
    lists["als"] = code_lists(als[0], codes, names)
    result = _result(lists, held_out)
    if ease is not None:
        result["systems"]["ease"]["lambda"] = ease[1]
    result["systems"]["als"].update(als[1])
    result["ranking"] = {"rmse": rating_rmse(backend, model_version, targets, data.stars(targets), names, sent)}
    return {"model_version": model_version, **result}


def earliest_half(test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per user with at least two test ratings: the earliest half (by timestamp, then movie id) and the rest."""
    earliest, rest = [], []
    for rows in group_rows(test):
        if len(rows) < 2:
            continue
        rows = rows[np.lexsort((rows[:, 1], rows[:, 3]))]
        earliest.append(rows[:len(rows) // 2])
        rest.append(rows[len(rows) // 2:])
    empty = np.zeros((0, test.shape[1]), test.dtype)
    return np.concatenate(earliest or [empty]), np.concatenate(rest or [empty])


def evaluate_recent(backend: Backend, catalogs: CatalogStore, data: MovieLens, holdout: str) -> dict:
    names = data.names
    _, test = fit_and_held_out(data.ratings, holdout)
    earliest, rest = earliest_half(rows_of(test, sample_users(test)))
    sent = interactions_by_user(earliest, names, data.rating_scale)
    held_out = held_out_by_user(rest, names)
    users = names.user_ids(np.unique(rest[:, 0]))
    pipeline = Pipeline(backend, catalogs)
    lists = {"two_stage": two_stage_lists(pipeline, users, sent=sent),
             "two_stage_without_interactions": two_stage_lists(pipeline, users),
             "two_stage_excluding_them": two_stage_lists(
                 pipeline, users, excluded={user: {item for item, _ in pairs} for user, pairs in sent.items()})}
    result = _result(lists, held_out)
    pairs = np.array([len(held_out[user]) for user in users], dtype=np.float64)
    hits = {system: np.array([sum(item in held_out[user] for item in lists[system][user][:10]) for user in users],
                             dtype=np.float64) for system in lists}
    # Paired over the same users: the standard error of a difference is far below either one's.
    result["difference"] = {f"vs_{name}": {"hr@10": float((hits["two_stage"] - hits[system]).sum() / pairs.sum()),
                                           "hr@10_se": _ratio_standard_error(hits["two_stage"] - hits[system], pairs)}
                            for name, system in (("without", "two_stage_without_interactions"),
                                                 ("excluding", "two_stage_excluding_them"))}
    return {"model_version": backend.current_version(), **result}


def default_protocol(holdout: str) -> str:
    return "fold-in" if holdout in USER_HOLDOUTS else "random"


def evaluate_export(models_dir: Path, data: MovieLens, protocol: str | None = None, item_to_item: bool = True) -> dict:
    """Metrics of the newest complete version in models_dir under `protocol` (by default the one its
    holdout was made for), with the baselines; the random protocol also scores SimilarItems and the
    reasons unless `item_to_item` is false."""
    backend, catalogs = InProcessBackend(models_dir), CatalogStore(models_dir)
    if not backend.refresh(catalogs.get):
        raise ModelsUnavailable(f"no loadable model version in {models_dir}")
    version = backend.current_version()
    metadata = json.loads(metadata_path(models_dir, int(version)).read_text())
    if metadata.get("dataset", "ml-100k") != data.dataset:
        raise ModelsUnavailable(f"model version {version} was trained on {metadata['dataset']}, not {data.dataset}; "
                                f"pass --dataset {metadata['dataset']}")
    # A version trained for tuning is scored on its validation part, never on test.
    holdout = metadata.get("holdout", "test")
    protocol = protocol or default_protocol(holdout)
    if (protocol == "fold-in") != (holdout in USER_HOLDOUTS):
        needs = "--holdout users (or users-validation)" if protocol == "fold-in" else "--holdout test (or validation)"
        raise ModelsUnavailable(f"the {protocol} protocol scores an export trained with {needs}; model version "
                                f"{version} was trained with --holdout {holdout}")
    evaluate = {"random": functools.partial(evaluate_random, item_to_item=item_to_item),
                "fold-in": evaluate_fold_in, "recent": evaluate_recent}[protocol]
    metrics = evaluate(backend, catalogs, data, holdout)
    metrics.update(protocol=protocol, holdout=holdout, preset=metadata["preset"]["name"],
                   train_seconds=metadata.get("train_seconds", {}))
    return metrics


def system_label(system: str, row: dict) -> str:
    """A system's name with the hyperparameters its baseline chose on the validation split."""
    if system == "ease":
        return f"EASE (lambda {row['lambda']:g})"
    if system == "als":
        return f"ALS ({row['factors']}f, reg {row['regularization']:g}, alpha {row['alpha']:g})"
    return LABELS.get(system, system)


def format_table(metrics: dict) -> str:
    lines = [f"model version {metrics['model_version']} (preset {metrics.get('preset', '?')}), {metrics['protocol']} "
             f"protocol, {metrics['holdout']} holdout: {metrics['users']} users, {metrics['pairs']} target pairs",
             f"{'system':<28} {'HR@10':>15} {'HR@100':>15} {'NDCG@10':>15}"]
    for system, row in metrics["systems"].items():
        cells = " ".join(f"{row[key]:>7.4f} ± {row[key + '_se']:.4f}" for key in ("hr@10", "hr@100", "ndcg@10"))
        lines.append(f"{system_label(system, row):<28} {cells}")
    if "ranking" in metrics:
        lines.append(f"ranker RMSE {metrics['ranking']['rmse']:.4f}")
    if "retrieval_index" in metrics:
        index, measured = metrics["retrieval_index"], metrics["retrieval_index"]["test_users"]
        cells = f" ({index['probes']} of {index['cells']} cells probed)" if index["kind"] == "partitioned" else ""
        lines.append(f"retrieval index: {index['kind']}{cells}, recall@{measured['recall_at']} against brute force "
                     f"{measured['recall']:.4f} on {measured['users']} test users")
    if "similar_items" in metrics:
        similar = metrics["similar_items"]
        lines.append(f"SimilarItems: item-to-item HR@10 {similar['served']['hr@10']:.4f} ± "
                     f"{similar['served']['hr@10_se']:.4f} (item-kNN {similar['item_knn']['hr@10']:.4f}); genre "
                     f"overlap of the 10 nearest "
                     f"{similar['served']['genre_overlap']:.3f} (item-kNN {similar['item_knn']['genre_overlap']:.3f}, "
                     f"random pairs {similar['random_pairs_genre_overlap']:.3f})")
    if "reasons" in metrics:
        reasons = metrics["reasons"]
        lines.append(f"Reasons: {reasons['items_with_a_reason']:.1%} of model items have one; the first was rated 4+ "
                     f"by the user for {reasons['first_reason_rated_4_or_more']:.1%} of them (any movie of theirs: "
                     f"{reasons['any_history_movie_rated_4_or_more']:.1%})")
    if "difference" in metrics:
        for name, label in (("vs_without", "without them"), ("vs_excluding", "with them only excluded")):
            difference = metrics["difference"][name]
            lines.append(f"HR@10 with interactions minus {label}: {difference['hr@10']:+.4f} "
                         f"± {difference['hr@10_se']:.4f}")
    return "\n".join(lines)


def write_json(metrics: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")


def write_plot(curves: dict[str, Sequence[float]], path: Path, title: str) -> None:
    """HR@k for k = 1..100, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    ks = np.arange(1, LIST_LENGTH + 1)
    for label, curve in curves.items():
        axes.plot(ks, curve, label=label)
    axes.set_xlabel("k (list length)")
    axes.set_ylabel("HR@k (held-out movies found)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
