"""retrieve (rated movies already dropped by the model) and rank, in one backend call ->
drop the request's exclusions -> order by score -> top k, with a popularity fallback.
Ranking every candidate and filtering after gives the same lists as filtering first,
since each pair's score is its own.

Written once; it does not know which backend runs the models. Offline evaluation
calls this same code, so its numbers are what the service returns.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from server.backend import Backend
from server.catalog import Catalog, CatalogStore
from server.errors import Cancelled, DeadlineExceeded, InvalidRequest, ModelsUnavailable
from server.limits import DEFAULT_K, MAX_EXCLUDED_ITEMS, MAX_ITEM_ID_LENGTH, MAX_K, MAX_USER_ID_LENGTH


@dataclass(frozen=True)
class Query:
    user_id: str
    k: int = DEFAULT_K
    exclude_item_ids: frozenset[str] = frozenset()
    include_rated: bool = False


@dataclass(frozen=True)
class Recommendation:
    rank: int
    item_id: str
    title: str
    genres: tuple[str, ...]
    score: float
    retrieval_score: float
    predicted_rating: float
    model_version: str
    fallback: bool


def make_query(user_id: str, k: int, exclude_item_ids: Sequence[str], include_rated: bool) -> Query:
    """Validate one request's fields; the limits are the ones the proto documents."""
    if not user_id or not user_id.strip():
        raise InvalidRequest("user_id must not be empty")
    if len(user_id) > MAX_USER_ID_LENGTH:
        raise InvalidRequest(f"user_id is {len(user_id)} characters; the maximum is {MAX_USER_ID_LENGTH}")
    if k > MAX_K:
        raise InvalidRequest(f"k={k} exceeds the maximum of {MAX_K}")
    if len(exclude_item_ids) > MAX_EXCLUDED_ITEMS:
        raise InvalidRequest(
            f"exclude_item_ids has {len(exclude_item_ids)} ids; the maximum is {MAX_EXCLUDED_ITEMS}")
    for position, item_id in enumerate(exclude_item_ids):
        if len(item_id) > MAX_ITEM_ID_LENGTH:
            raise InvalidRequest(f"exclude_item_ids[{position}] is {len(item_id)} characters; "
                                 f"the maximum is {MAX_ITEM_ID_LENGTH}")
    return Query(user_id=user_id, k=k or DEFAULT_K, exclude_item_ids=frozenset(exclude_item_ids),
                 include_rated=include_rated)


class Deadline:
    """Seconds left of the caller's deadline, checked between stages; also stops work for
    callers that went away (`is_cancelled`)."""

    def __init__(self, seconds: float | None, is_cancelled: Callable[[], bool] | None = None):
        self.expires = None if seconds is None else time.monotonic() + seconds
        self.is_cancelled = is_cancelled

    def remaining(self) -> float | None:
        if self.is_cancelled is not None and self.is_cancelled():
            raise Cancelled("the caller cancelled the request")
        if self.expires is None:
            return None
        left = self.expires - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("deadline exceeded before the recommendation was complete")
        return left


class Pipeline:
    def __init__(self, backend: Backend, catalogs: CatalogStore):
        self.backend = backend
        self.catalogs = catalogs

    def current_catalog(self) -> Catalog:
        version = self.backend.current_version()
        if version is None:
            raise ModelsUnavailable("no model version is being served yet")
        return self.catalogs.get(version)

    def recommend(self, queries: Sequence[Query], timeout: float | None = None,
                  stage_seconds: dict[str, float] | None = None,
                  is_cancelled: Callable[[], bool] | None = None) -> list[list[Recommendation]]:
        """Recommendations for each query, best first, in the order of `queries`.

        `stage_seconds`, if given, accumulates the time spent in the models, per stage where the
        backend can tell them apart ("retrieval", "ranking"), else as "models".
        """
        if not queries:
            return []
        deadline = Deadline(timeout, is_cancelled)
        timings = stage_seconds if stage_seconds is not None else {}
        results: list[list[Recommendation] | None] = [None] * len(queries)
        for include_rated in (False, True):
            group = [i for i, query in enumerate(queries) if query.include_rated == include_rated]
            if group:
                group_results = self._recommend_group([queries[i] for i in group], include_rated, deadline, timings)
                for i, items in zip(group, group_results):
                    results[i] = items
        return results  # type: ignore[return-value]

    def _recommend_group(self, queries: list[Query], include_rated: bool, deadline: Deadline,
                         timings: dict[str, float]) -> list[list[Recommendation]]:
        # Users no model knows need no model call: they get the popularity fallback.
        known = self.current_catalog()
        user_ids = list(dict.fromkeys(query.user_id for query in queries if known.is_known_user(query.user_id)))
        ranked, catalog = None, known
        if user_ids:
            ranked = self.backend.retrieve_and_rank(user_ids, include_rated, deadline.remaining(), timings)
            catalog = self.catalogs.get(ranked.model_version)
        row_of_user = {user_id: row for row, user_id in enumerate(user_ids)}
        results = []
        for query in queries:
            row = row_of_user.get(query.user_id)
            items: list[Recommendation] = []
            if row is not None and catalog.is_known_user(query.user_id):
                item_ids, score = ranked.item_ids[row], ranked.score[row]
                order = np.argsort(-score, kind="stable").tolist()  # ties keep retrieval order: deterministic
                if query.exclude_item_ids:  # a set lookup per candidate: no array of every id padded to the longest
                    order = [i for i in order if item_ids[i] not in query.exclude_item_ids]
                items = [
                    Recommendation(rank=position + 1, item_id=item_ids[i], title=catalog.titles.get(item_ids[i], ""),
                                   genres=catalog.genres.get(item_ids[i], ()), score=float(score[i]),
                                   retrieval_score=float(ranked.retrieval_scores[row, i]),
                                   predicted_rating=float(ranked.predicted_rating[row, i]),
                                   model_version=catalog.model_version, fallback=False)
                    for position, i in enumerate(order[:query.k])
                ]
            results.append(self._fill_with_popular(items, query, catalog))
        return results

    @staticmethod
    def _fill_with_popular(items: list[Recommendation], query: Query, catalog: Catalog) -> list[Recommendation]:
        """Cold start, or too few candidates left: most popular movies not seen, excluded or listed."""
        if len(items) >= query.k:
            return items
        taken = {item.item_id for item in items} | query.exclude_item_ids
        if not query.include_rated:
            taken |= catalog.rated_item_ids.get(query.user_id, frozenset())
        for item_id in catalog.popular_item_ids:
            if len(items) >= query.k:
                break
            if item_id not in taken:
                items.append(Recommendation(rank=len(items) + 1, item_id=item_id, title=catalog.titles[item_id],
                                            genres=catalog.genres[item_id], score=0.0, retrieval_score=0.0,
                                            predicted_rating=0.0, model_version=catalog.model_version, fallback=True))
        return items
