"""The serving pipeline: merge each user's history, retrieve and rank (one backend call for a
batch of users), drop the request's exclusions, order by score, keep the top k, and fill up
from popularity where the models have nothing to say.

A user is an id plus a history. The models know each trained user's history; a request adds
its `recent_interactions`, and the models compute both stages from the merged history, so an
unknown user who sent interactions is served from them alone. Ranking every candidate and
filtering after gives the same lists as filtering first, since each pair's score is its own.

Written once; it does not know which backend runs the models. Offline evaluation
calls this same code, so its numbers are what the service returns.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from recsys.server.backend import Backend, Deadline, RankedCandidates, UserBatch, remaining
from recsys.server.catalog import Catalog, CatalogStore
from recsys.server.errors import ModelsUnavailable, NotFound, StoreUnavailable
from recsys.server.options import DEFAULTS
from recsys.server.store import NO_RECORDS, InteractionStore, UserRecords
from recsys.server.validation import Interaction, Query, SimilarQuery

# The id the models see for a user they must not recognise (no trained history; row 0 of every tower).
ANONYMOUS_USER = ""
# SimilarItems with a user: at least this many nearest movies are ordered for them.
SIMILAR_POOL = 30


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
    # Movies of the user's history that raise this one's score the most, and their titles.
    because_item_ids: tuple[str, ...] = ()
    because_titles: tuple[str, ...] = ()


@dataclass(frozen=True)
class RankedList:
    """One query's answer: the items, best first; how many of its interactions (sent or stored)
    named movies the models do not know (ignored; the request log counts them); and how many
    came from the interaction store."""

    items: list[Recommendation] = field(default_factory=list)
    unknown_interactions: int = 0
    stored_interactions: int = 0


def with_stored(query: Query, stored: Sequence[Interaction]) -> Query:
    """The query as if its caller had also sent the user's stored interactions: the request's own
    are newer, so they win, except that a rating-less one keeps a stored rating."""
    if not stored:
        return query
    merged = {entry.item_id: entry.rating for entry in reversed(stored)}  # oldest first, newest last
    for item_id, rating in query.recent_interactions:
        if rating or item_id not in merged:
            merged[item_id] = rating
    return dataclasses.replace(query, recent_interactions=tuple(merged.items()))


def as_served(query: Query, records: UserRecords) -> Query:
    """The query as the models see it: its user's stored interactions merged in (`with_stored`), and
    an erased user (ForgetUser) served as an unknown id, from what they sent and recorded since: the
    models' copy of their training history is not used, from the erasure on, until a version trained
    without them is served."""
    merged = with_stored(query, records.recent.get(query.user_id, ()))
    if query.user_id in records.forgotten:
        return dataclasses.replace(merged, user_id=ANONYMOUS_USER)
    return merged


class Pipeline:
    """`store`: recorded interactions, each user's newest `stored_interactions` merged into every
    query (`with_stored`), read within `store_read_seconds`; when the store fails or runs out of
    that budget, queries go on with what the caller sent."""

    def __init__(self, backend: Backend, catalogs: CatalogStore, store: InteractionStore | None = None,
                 stored_interactions: int = DEFAULTS.stored_interactions, reasons: bool = DEFAULTS.reasons,
                 store_read_seconds: float = DEFAULTS.store_read_seconds):
        """`reasons`: fill each model item's `because_item_ids` (one more model call per batch)."""
        self.backend = backend
        self.catalogs = catalogs
        self.store = store
        self.stored_interactions = stored_interactions
        self.reasons = reasons
        self.store_read_seconds = store_read_seconds
        self.store_reads_failed = 0  # Recommend calls served without their stored interactions

    def _stored(self, queries: Sequence[Query], deadline: Deadline) -> UserRecords:
        """The batch's users' stored interactions and erasures, in one transaction within the read
        budget; if the store fails or is slower than that, no interactions, and the erasures made
        through this server. Erasures are read even when no stored interactions are merged
        (`stored_interactions` 0)."""
        if self.store is None:
            return NO_RECORDS
        with deadline.stage("store"):
            try:
                return self.store.records_within([query.user_id for query in queries],
                                                 max(self.stored_interactions, 0), self.store_read_seconds)
            except StoreUnavailable:
                self.store_reads_failed += 1
                return UserRecords({}, self.store.erased_here([query.user_id for query in queries]))

    def current_catalog(self) -> Catalog:
        version = self.backend.current_version()
        if version is None:
            raise ModelsUnavailable("no model version is being served yet")
        return self.catalogs.get(version)

    def recommend(self, queries: Sequence[Query], deadline: Deadline | None = None) -> list[RankedList]:
        """Recommendations for each query, best first, in the order of `queries`.

        The deadline's timings get the time spent in the store, the models (per stage where the
        backend can tell them apart, "retrieval" and "ranking", else "models") and the reasons.
        """
        if not queries:
            return []
        deadline = deadline or Deadline()
        records = self._stored(queries, deadline)
        stored_counts = [len(records.recent.get(query.user_id, ())) for query in queries]
        queries = [as_served(query, records) for query in queries]
        results: list[RankedList | None] = [None] * len(queries)
        for include_rated in (False, True):
            group = [i for i, query in enumerate(queries) if query.include_rated == include_rated]
            if group:
                group_results = self._recommend_group([queries[i] for i in group], include_rated, deadline)
                for i, result in zip(group, group_results):
                    results[i] = dataclasses.replace(result, stored_interactions=stored_counts[i])
        return results  # type: ignore[return-value]

    def _recommend_group(self, queries: list[Query], include_rated: bool, deadline: Deadline) -> list[RankedList]:
        catalog = self.current_catalog()
        # One model row per distinct (user, known interactions). Users the models know nothing of
        # (no id, no known movie sent) need no model call: they get the popularity fallback.
        known_interactions = [tuple(pair for pair in query.recent_interactions if pair[0] in catalog.titles)
                              for query in queries]
        row_of: dict[tuple[str, tuple[tuple[str, float], ...]], int] = {}
        for query, interactions in zip(queries, known_interactions):
            if catalog.is_known_user(query.user_id) or interactions and catalog.serves_interactions:
                row_of.setdefault((query.user_id, interactions), len(row_of))
        rows = [row_of.get((query.user_id, interactions)) for query, interactions in zip(queries, known_interactions)]
        lists: list[list[Recommendation]] = [[] for _ in queries]
        if row_of:
            users = UserBatch.of([user for user, _ in row_of], [interactions for _, interactions in row_of])
            # k plus the exclusions covers every list's items: explained in the same model call where possible.
            explain_top = max(query.k + len(query.exclude_item_ids) for query in queries) if self.reasons else 0
            remaining(deadline)  # nothing more for a caller gone or out of time
            ranked = self.backend.retrieve_and_rank(users, include_rated, deadline, explain_top)
            catalog = self.catalogs.get(ranked.model_version)
            explained = self._explained(ranked)
            lists = [[] if row is None else self._ranked_items(query, ranked, row, catalog, explained.get(row, {}))
                     for query, row in zip(queries, rows)]
            if self.reasons:
                self._explain_the_rest(users, rows, lists, explained, ranked.model_version, catalog, deadline)
        rated = self._rated_for_the_fill(lists, queries, catalog, deadline)
        return [RankedList(self._fill_with_popular(items, query, catalog, rated.get(query.user_id, frozenset())),
                           len(query.recent_interactions) - len(interactions))
                for items, query, interactions in zip(lists, queries, known_interactions)]

    def _rated_for_the_fill(self, lists: list[list[Recommendation]], queries: list[Query], catalog: Catalog,
                            deadline: Deadline) -> dict[str, frozenset[str]]:
        """The training history of each known user whose list the popularity fill must complete (fewer
        model items than asked for, rated movies left out): one call of the retrieval model's
        `rated_items`, with the version of the catalog. Lists the models filled need none."""
        short = sorted({query.user_id for items, query in zip(lists, queries)
                        if len(items) < query.k and not query.include_rated and catalog.is_known_user(query.user_id)})
        if not short:
            return {}
        remaining(deadline)
        return dict(zip(short, self.backend.rated_items(short, catalog.model_version, deadline)))

    @staticmethod
    def _explained(ranked: RankedCandidates) -> dict[int, dict[str, tuple[str, ...]]]:
        """The reasons the ranked call brought: model row -> movie -> reasons."""
        if ranked.explained_item_ids is None:
            return {}
        return {row: {item_id: tuple(reason for reason in reasons if reason)
                      for item_id, reasons in zip(ranked.explained_item_ids[row], ranked.because_item_ids[row])}
                for row in range(len(ranked.item_ids))}

    @staticmethod
    def _ranked_items(query: Query, ranked: RankedCandidates, row: int, catalog: Catalog,
                      reasons: dict[str, tuple[str, ...]]) -> list[Recommendation]:
        """The query's model items: its row's candidates by score, exclusions dropped, the best k, with
        their reasons where known."""
        item_ids, score, retrieval_scores = ranked.item_ids[row], ranked.score[row], ranked.retrieval_scores[row]
        order = np.argsort(-score, kind="stable")  # ties keep retrieval order: deterministic
        # -inf: a movie the model excluded (the user's history), listed only when history left fewer
        # candidates than it returns. Exclusions are a set lookup per candidate: no array of every id
        # padded to the longest.
        order = order[retrieval_scores[order] != -np.inf].tolist()
        if query.exclude_item_ids:
            order = [i for i in order if item_ids[i] not in query.exclude_item_ids]
        items = []
        for position, i in enumerate(order[:query.k]):
            because = reasons.get(item_ids[i], ())
            items.append(Recommendation(
                rank=position + 1, item_id=item_ids[i], title=catalog.titles.get(item_ids[i], ""),
                genres=catalog.genres.get(item_ids[i], ()), score=float(score[i]),
                retrieval_score=float(retrieval_scores[i]), predicted_rating=float(ranked.predicted_rating[row, i]),
                model_version=catalog.model_version, fallback=False, because_item_ids=because,
                because_titles=tuple(catalog.titles.get(reason, "") for reason in because)))
        return items

    def _explain_the_rest(self, users: UserBatch, rows: list[int | None], lists: list[list[Recommendation]],
                          explained: dict[int, dict[str, tuple[str, ...]]], model_version: str, catalog: Catalog,
                          deadline: Deadline) -> None:
        """Fill the reasons of model items the ranked call did not explain (a backend that cannot, or more
        items than asked for): one call of the ranking model's `explain` for all of them."""
        missing: dict[int, list[str]] = {}
        for row, items in zip(rows, lists):
            for item in items:
                if item.item_id not in explained.get(row, {}) and item.item_id not in missing.get(row, []):
                    missing.setdefault(row, []).append(item.item_id)
        if not missing:
            return
        width = max(len(items) for items in missing.values())
        item_ids = np.full((len(users), width), "", dtype=object)
        for row, items in missing.items():
            item_ids[row, :len(items)] = items
        remaining(deadline)
        with deadline.stage("reasons"):
            because = self.backend.explain(users, item_ids, model_version, deadline)
        for row, items in zip(rows, lists):
            if row not in missing:
                continue
            column = {item_id: n for n, item_id in enumerate(missing[row])}
            for position, item in enumerate(items):
                if item.item_id in column:
                    reasons = tuple(reason for reason in because[row, column[item.item_id]] if reason)
                    items[position] = dataclasses.replace(
                        item, because_item_ids=reasons, because_titles=tuple(catalog.titles.get(r, "") for r in reasons))

    def similar(self, query: SimilarQuery, deadline: Deadline | None = None) -> list[Recommendation]:
        """SimilarItems: the movie's nearest movies; with a user, their history left out and the nearest
        `max(3k, SIMILAR_POOL)` ordered for them by the ranking model."""
        deadline = deadline or Deadline()
        catalog = self.current_catalog()
        if query.item_id not in catalog.titles:
            raise NotFound(f"item_id {query.item_id!r} is not a movie the models know")
        interactions: tuple[tuple[str, float], ...] = ()
        model_user = query.user_id
        if query.user_id:
            user = as_served(Query(query.user_id), self._stored([Query(query.user_id)], deadline))
            model_user = user.user_id
            interactions = tuple(pair for pair in user.recent_interactions if pair[0] in catalog.titles)
        users = UserBatch.of([model_user], [interactions])
        remaining(deadline)
        nearest = self.backend.similar(users, [query.item_id], deadline)
        catalog = self.catalogs.get(nearest.model_version)
        pairs = [(item_id, float(similarity)) for item_id, similarity in zip(nearest.item_ids[0], nearest.scores[0])
                 if similarity != -np.inf and item_id not in query.exclude_item_ids]
        if not query.user_id:
            chosen = [(item_id, similarity, similarity, 0.0) for item_id, similarity in pairs[:query.k]]
        else:
            pool = pairs[:max(3 * query.k, SIMILAR_POOL)]
            remaining(deadline)
            scores = self.backend.rank(users, np.array([[item_id for item_id, _ in pool]], dtype=object),
                                       nearest.model_version, deadline)
            order = np.argsort(-scores.score[0], kind="stable")[:query.k]
            chosen = [(pool[i][0], float(scores.score[0, i]), pool[i][1], float(scores.predicted_rating[0, i]))
                      for i in order]
        return [Recommendation(rank=position + 1, item_id=item_id, title=catalog.titles.get(item_id, ""),
                               genres=catalog.genres.get(item_id, ()), score=score, retrieval_score=similarity,
                               predicted_rating=stars, model_version=catalog.model_version, fallback=False)
                for position, (item_id, score, similarity, stars) in enumerate(chosen)]

    @staticmethod
    def _fill_with_popular(items: list[Recommendation], query: Query, catalog: Catalog,
                           rated: frozenset[str]) -> list[Recommendation]:
        """Cold start, or too few candidates left: most popular movies not seen (`rated`: the user's
        training history), excluded or listed."""
        if len(items) >= query.k:
            return items
        taken = {item.item_id for item in items} | query.exclude_item_ids
        if not query.include_rated:
            taken |= rated
            taken |= {item_id for item_id, _ in query.recent_interactions}
        for item_id in catalog.popular_item_ids:
            if len(items) >= query.k:
                break
            if item_id not in taken:
                items.append(Recommendation(rank=len(items) + 1, item_id=item_id, title=catalog.titles[item_id],
                                            genres=catalog.genres[item_id], score=0.0, retrieval_score=0.0,
                                            predicted_rating=0.0, model_version=catalog.model_version, fallback=True))
        return items
