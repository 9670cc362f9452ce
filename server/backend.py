"""What the pipeline needs from any model host: the `Backend` contract and the types it speaks.

TensorFlow-free on purpose: the pipeline, the batcher and the servicer import only this, so they
run (and are tested, against a fake backend) without a model. The hosts are `server.in_process`
(SavedModels in this process) and `server.tf_serving` (TF Serving over gRPC)."""
from __future__ import annotations

import abc
import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from recsys.server.catalog import Catalog
from recsys.server.errors import Cancelled, DeadlineExceeded


class Deadline:
    """One request's budget, handed down every layer (servicer, batcher, pipeline, backend) in place
    of timeouts: when it expires, whether its caller went away, and where its time went.

    `remaining()` is what a network call may take (None: no deadline); it raises DeadlineExceeded
    once the time is up and Cancelled once `is_cancelled` says the caller is gone, so work stops
    between stages. `timings` collects seconds per stage (`stage`), for the request log and metrics.
    """

    def __init__(self, seconds: float | None = None, is_cancelled: Callable[[], bool] | None = None,
                 timings: dict[str, float] | None = None):
        self.expires = None if seconds is None else time.monotonic() + seconds
        self.is_cancelled = is_cancelled
        self.timings = timings if timings is not None else {}

    @classmethod
    def until(cls, expires: float | None, is_cancelled: Callable[[], bool] | None = None,
              timings: dict[str, float] | None = None) -> "Deadline":
        """A deadline at `expires` (time.monotonic()), e.g. the latest of a batch's callers'."""
        deadline = cls(None, is_cancelled, timings)
        deadline.expires = expires
        return deadline

    def capped(self, seconds: float) -> "Deadline":
        """The same request, never longer than `seconds` from now (a backend call's cap)."""
        cap = time.monotonic() + seconds
        return Deadline.until(cap if self.expires is None else min(self.expires, cap), self.is_cancelled, self.timings)

    def gone(self) -> bool:
        """Whether the caller went away."""
        return self.is_cancelled is not None and self.is_cancelled()

    def remaining(self) -> float | None:
        if self.gone():
            raise Cancelled("the caller cancelled the request")
        if self.expires is None:
            return None
        left = self.expires - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("deadline exceeded before the recommendation was complete")
        return left

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Adds the block's wall time to `timings[name]`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started


def remaining(deadline: Deadline | None) -> float | None:
    """Seconds a call may take under `deadline` (None: no limit)."""
    return None if deadline is None else deadline.remaining()


def histories(item_ids: np.ndarray) -> list[frozenset[str]]:
    """`rated_items`' output (str [users, longest], "" padding) as one set of movies per user."""
    return [frozenset(item for item in row if item) for row in item_ids.tolist()]


@dataclass(frozen=True)
class UserBatch:
    """The users of one model call as every signature takes them: ids, and each user's recent
    interactions padded to one width ("" and 0 stars pad; a user without any has only padding)."""

    user_ids: list[str]
    interaction_item_ids: np.ndarray  # object [users, n]
    interaction_ratings: np.ndarray  # float32 [users, n]; 0 = no rating

    @classmethod
    def of(cls, user_ids: Sequence[str],
           interactions: Sequence[Sequence[tuple[str, float]]] | None = None) -> "UserBatch":
        """`interactions`: per user, (movie id, stars) pairs; None: none for anyone."""
        rows = interactions if interactions is not None else [()] * len(user_ids)
        width = max((len(row) for row in rows), default=0)
        item_ids = np.full((len(user_ids), width), "", dtype=object)
        ratings = np.zeros((len(user_ids), width), dtype=np.float32)
        for position, row in enumerate(rows):
            if row:
                item_ids[position, :len(row)] = [item for item, _ in row]
                ratings[position, :len(row)] = [stars for _, stars in row]
        return cls(list(user_ids), item_ids, ratings)

    def repeated(self, times: int) -> "UserBatch":
        """Each user `times` times in a row (one row per candidate pair)."""
        return UserBatch(np.repeat(np.asarray(self.user_ids, dtype=object), times).tolist(),
                         np.repeat(self.interaction_item_ids, times, axis=0),
                         np.repeat(self.interaction_ratings, times, axis=0))

    def __len__(self) -> int:
        return len(self.user_ids)


@dataclass(frozen=True)
class Candidates:
    item_ids: np.ndarray  # str [users, candidate_count], best first
    scores: np.ndarray  # float32 [users, candidate_count]
    model_version: str


@dataclass(frozen=True)
class Scores:
    predicted_rating: np.ndarray  # float32 [users, candidates]
    score: np.ndarray  # float32 [users, candidates]
    model_version: str


@dataclass(frozen=True)
class RankedCandidates:
    """Each user's retrieved candidates (retrieval order) with the ranker's outputs for each, and,
    where the backend explained them in the same call, the reasons of each user's best."""

    item_ids: np.ndarray  # str [users, candidate_count]
    retrieval_scores: np.ndarray  # float32 [users, candidate_count]
    score: np.ndarray  # float32 [users, candidate_count]
    predicted_rating: np.ndarray  # float32 [users, candidate_count]
    model_version: str
    explained_item_ids: np.ndarray | None = None  # str [users, explained]
    because_item_ids: np.ndarray | None = None  # str [users, explained, reasons]


class Backend(abc.ABC):
    """Where the SavedModels run. `deadline`: the request's (None: none); a backend that waits on the
    network gives each call what is left of it."""

    name: str
    # True when a model call is computation in this process (no network waits): batches then
    # run one at a time.
    in_process: bool = False
    # Model versions that failed to load (in-process) so far; exported as a metric.
    load_failures: int = 0

    @abc.abstractmethod
    def retrieve(self, users: UserBatch, include_rated: bool, deadline: Deadline | None = None) -> Candidates:
        ...

    @abc.abstractmethod
    def rank(self, users: UserBatch, item_ids: np.ndarray, model_version: str,
             deadline: Deadline | None = None) -> Scores:
        """Score each user's movies (`item_ids`: [users, candidates]) with the ranking model of
        `model_version` (the one that retrieved them)."""

    @abc.abstractmethod
    def explain(self, users: UserBatch, item_ids: np.ndarray, model_version: str,
                deadline: Deadline | None = None) -> np.ndarray:
        """For each user's movies (`item_ids`: [users, n]), the movies of their history that raise the
        score the most: str [users, n, reasons], "" where fewer do (the ranking model's `explain`)."""

    @abc.abstractmethod
    def rated_items(self, user_ids: Sequence[str], model_version: str,
                    deadline: Deadline | None = None) -> list[frozenset[str]]:
        """Each user's training history with the retrieval model of `model_version` (its `rated_items`):
        what the popularity fill leaves out. Asked only when a list needs the fill."""

    @abc.abstractmethod
    def similar(self, users: UserBatch, item_ids: Sequence[str], deadline: Deadline | None = None) -> Candidates:
        """Each movie's nearest movies (one movie per user row; "" user ids for none), without the movie
        itself or the user's history (the retrieval model's `similar_items`)."""

    def retrieve_and_rank(self, users: UserBatch, include_rated: bool, deadline: Deadline | None = None,
                          explain_top: int = 0) -> RankedCandidates:
        """Both stages for every candidate of every user: retrieve, then rank all candidates in one call
        with the same model version, timed as the deadline's "retrieval" and "ranking" stages.
        `explain_top`: a backend that can explain each user's best movies in the same call does so
        (`fuse`); others leave that to `explain`."""
        deadline = deadline or Deadline()
        with deadline.stage("retrieval"):
            candidates = self.retrieve(users, include_rated, deadline)
        with deadline.stage("ranking"):
            ranked = self.rank(users, candidates.item_ids, candidates.model_version, deadline)
        return RankedCandidates(candidates.item_ids, candidates.scores, ranked.score, ranked.predicted_rating,
                                candidates.model_version)

    @abc.abstractmethod
    def refresh(self, load_catalog: Callable[[str], Catalog]) -> bool:
        """Called periodically: load or reconnect as needed; return whether requests can be served.

        A version is served only once `load_catalog(version)` has parsed and checked its metadata
        (raising ModelsUnavailable otherwise): a version loads whole or not at all."""

    @abc.abstractmethod
    def is_ready(self) -> bool:
        ...

    def not_ready_reason(self) -> str:
        """Why is_ready() is false, for the UNAVAILABLE message callers see."""
        return "models are not loaded yet"

    @abc.abstractmethod
    def current_version(self) -> str | None:
        """The model version new requests will be served by, if known."""

    def close(self) -> None:  # noqa: B027 - optional: only backends holding connections override it
        """Release what the backend holds (connections); nothing by default."""
