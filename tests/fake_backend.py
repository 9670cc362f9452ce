"""A fake model host for fast unit tests of the pipeline, batcher and servicer (like kserve's DummyModel).

It speaks the `server.backend.Backend` contract with no TensorFlow and no trained model: a small
catalog written as real metadata (so the real `CatalogStore` reads it), and scores that are a fixed
function of (user, movie) plus what the user sent, so a test can predict every list. `delay` makes
each call take that long; `fail_with` makes each call raise it.
"""
from __future__ import annotations

import json
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from recsys.server.backend import Backend, Candidates, Deadline, RankedCandidates, Scores, UserBatch
from recsys.server.catalog import Catalog
from recsys.server.layout import METADATA_DIR

VERSION = "1"
FAKE_HISTORY = "fake-rated-items.json"  # the fake model's training history: user -> rated movies


def movie_ids(count: int) -> list[str]:
    return [f"m{n}" for n in range(count)]


def write_fake_metadata(models_dir: Path, movies: int = 50, rated: dict[str, list[str]] | None = None,
                        candidate_count: int = 20) -> Path:
    """metadata/1.json for `movies` movies ("m0", "m1", ...; popularity in that order) and the trained
    users, whose rated movies (default: "u1" rated m0 to m4) the fake model keeps in a file of its
    own, as the real ones keep them in their graphs."""
    items = movie_ids(movies)
    rated = {"u1": items[:5]} if rated is None else rated
    metadata = {"model_version": int(VERSION), "candidate_count": candidate_count,
                "items": {item: {"title": f"Movie {item}", "genres": ["Drama"]} for item in items},
                "popular_item_ids": items, "user_ids": sorted(rated), "preset": {"name": "fake"},
                "serves_interactions": True}
    (models_dir / METADATA_DIR).mkdir(parents=True, exist_ok=True)
    (models_dir / METADATA_DIR / f"{VERSION}.json").write_text(json.dumps(metadata))
    (models_dir / FAKE_HISTORY).write_text(json.dumps(rated))
    return models_dir


def affinity(user_id: str, item_id: str) -> float:
    """A fixed score in [0, 1) for (user, movie)."""
    return (zlib.crc32(f"{user_id}|{item_id}".encode()) % 10_000) / 10_000


class FakeBackend(Backend):
    """Scores each candidate with `affinity`, plus 1 for a movie next to one the user sent (m3 sent:
    m2 and m4 go up); never returns a user's trained or sent movies unless `include_rated`."""

    name = "fake"
    in_process = True

    def __init__(self, models_dir: Path, delay: float = 0.0, fail_with: Exception | None = None,
                 gate: threading.Event | None = None):
        """`gate`: every call first waits (up to 30 s) for it to be set, so a test can queue work."""
        self.gate = gate
        metadata = json.loads((Path(models_dir) / METADATA_DIR / f"{VERSION}.json").read_text())
        self.movies = list(metadata["popular_item_ids"])
        self.position = {item: n for n, item in enumerate(self.movies)}
        self.rated = {user: set(items) for user, items in json.loads((Path(models_dir) / FAKE_HISTORY).read_text()).items()}
        self.candidate_count = metadata["candidate_count"]
        self.delay, self.fail_with = delay, fail_with
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.user_ids_seen: list[str] = []
        self._lock = threading.Lock()

    def _call(self, users: UserBatch) -> None:
        with self._lock:
            self.calls += 1
            self.batch_sizes.append(len(users))
            self.user_ids_seen.extend(users.user_ids)
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with

    def _sent(self, users: UserBatch, row: int) -> set[str]:
        return {item for item in users.interaction_item_ids[row].tolist() if item}

    def _near(self, users: UserBatch, row: int) -> set[str]:
        """The movies next to one the user sent (in popularity order)."""
        return {self.movies[n + step] for item in self._sent(users, row) for step in (-1, 1)
                if 0 <= (n := self.position[item]) + step < len(self.movies)}

    def _scores(self, users: UserBatch, row: int, item_ids) -> list[float]:
        near = self._near(users, row)
        return [affinity(users.user_ids[row], item) + (1.0 if item in near else 0.0) for item in item_ids]

    def retrieve(self, users: UserBatch, include_rated: bool, deadline: Deadline | None = None) -> Candidates:
        self._call(users)
        item_ids, scores = [], []
        for row, user in enumerate(users.user_ids):
            seen = set() if include_rated else self.rated.get(user, set()) | self._sent(users, row)
            scored = sorted(((score if item not in seen else -np.inf, item)
                             for score, item in zip(self._scores(users, row, self.movies), self.movies)),
                            key=lambda pair: -pair[0])[:self.candidate_count]
            item_ids.append([item for _, item in scored])
            scores.append([score for score, _ in scored])
        return Candidates(np.array(item_ids, dtype=object).astype(str), np.array(scores, np.float32), VERSION)

    def rank(self, users: UserBatch, item_ids: np.ndarray, model_version: str,
             deadline: Deadline | None = None) -> Scores:
        self._call(users)
        score = np.array([self._scores(users, row, item_ids[row]) for row in range(len(users))], np.float32)
        return Scores(3.0 + score, score, model_version)

    def retrieve_and_rank(self, users: UserBatch, include_rated: bool, deadline: Deadline | None = None,
                          explain_top: int = 0) -> RankedCandidates:
        candidates = self.retrieve(users, include_rated, deadline)
        scores = self.rank(users, candidates.item_ids, candidates.model_version, deadline)
        return RankedCandidates(candidates.item_ids, candidates.scores, scores.score, scores.predicted_rating,
                                VERSION)

    def explain(self, users: UserBatch, item_ids: np.ndarray, model_version: str,
                deadline: Deadline | None = None) -> np.ndarray:
        self._call(users)
        reasons = np.full((*item_ids.shape, 3), "", dtype=object)
        for row in range(len(users)):
            sent = sorted(self._sent(users, row))[:3]
            reasons[row, :, :len(sent)] = sent
        return reasons.astype(str)

    def rated_items(self, user_ids: Sequence[str], model_version: str,
                    deadline: Deadline | None = None) -> list[frozenset[str]]:
        self._call(UserBatch.of(user_ids))
        return [frozenset(self.rated.get(user, ())) for user in user_ids]

    def similar(self, users: UserBatch, item_ids: Sequence[str], deadline: Deadline | None = None) -> Candidates:
        self._call(users)
        rows = [[item for item in self.movies if item != query][:self.candidate_count] for query in item_ids]
        return Candidates(np.array(rows, dtype=object).astype(str),
                          np.tile(np.linspace(1, 0, self.candidate_count, dtype=np.float32), (len(rows), 1)), VERSION)

    def refresh(self, load_catalog: Callable[[str], Catalog]) -> bool:
        load_catalog(VERSION)
        return True

    def is_ready(self) -> bool:
        return True

    def current_version(self) -> str | None:
        return VERSION
