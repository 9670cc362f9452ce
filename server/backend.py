"""The two calls the pipeline needs from any model host, and the in-process host."""
from __future__ import annotations

import abc
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

from server.errors import ModelsUnavailable
from server.layout import (DEFAULT_SIGNATURE, INCLUDE_RATED_SIGNATURE, RANKING_MODEL, RETRIEVAL_MODEL,
                           complete_versions)

log = logging.getLogger("recsys.server")


@dataclass(frozen=True)
class Candidates:
    item_ids: np.ndarray  # str [users, candidate_count], best first
    scores: np.ndarray  # float32 [users, candidate_count]
    model_version: str


@dataclass(frozen=True)
class Scores:
    predicted_rating: np.ndarray  # float32 [pairs]
    score: np.ndarray  # float32 [pairs]
    model_version: str


class Backend(abc.ABC):
    """Where the SavedModels run. `timeout` is the seconds left of the caller's deadline."""

    name: str

    @abc.abstractmethod
    def retrieve(self, user_ids: Sequence[str], include_rated: bool, timeout: float | None = None) -> Candidates:
        ...

    @abc.abstractmethod
    def rank(self, user_ids: Sequence[str], item_ids: Sequence[str], model_version: str,
             timeout: float | None = None) -> Scores:
        """Score pairs with the ranking model of `model_version` (the one that retrieved them)."""

    @abc.abstractmethod
    def refresh(self) -> bool:
        """Called periodically: load or reconnect as needed; return whether requests can be served."""

    @abc.abstractmethod
    def is_ready(self) -> bool:
        ...

    def not_ready_reason(self) -> str:
        """Why is_ready() is false, for the UNAVAILABLE message callers see."""
        return "models are not loaded yet"

    @abc.abstractmethod
    def current_version(self) -> str | None:
        """The model version new requests will be served by, if known."""

    def close(self) -> None:
        pass


def _strings(tensor: tf.Tensor) -> np.ndarray:
    return tensor.numpy().astype(str)


@dataclass(frozen=True)
class LoadedPair:
    model_version: str
    retrieve: dict[bool, object]  # include_rated -> concrete signature function
    rank: object


def load_pair(models_dir: Path, version: int) -> LoadedPair:
    retrieval = tf.saved_model.load(str(models_dir / RETRIEVAL_MODEL / str(version)))
    ranking = tf.saved_model.load(str(models_dir / RANKING_MODEL / str(version)))
    return LoadedPair(
        model_version=str(version),
        retrieve={False: retrieval.signatures[DEFAULT_SIGNATURE], True: retrieval.signatures[INCLUDE_RATED_SIGNATURE]},
        rank=ranking.signatures[DEFAULT_SIGNATURE],
    )


class InProcessBackend(Backend):
    """Runs the exported SavedModels inside this process.

    `refresh()` loads the newest complete version (or the pinned one) next to the
    one serving, checks it answers, then swaps the pair in one assignment; a version
    that fails to load is logged, remembered and skipped.
    """

    name = "in-process"

    def __init__(self, models_dir: Path, model_version: int | None = None):
        self.models_dir = Path(models_dir)
        self.pinned_version = model_version
        self.current: LoadedPair | None = None
        self._pairs: dict[str, LoadedPair] = {}
        self._failed_versions: set[int] = set()
        self._lock = threading.Lock()

    def _wanted_version(self) -> int | None:
        versions = [v for v in complete_versions(self.models_dir) if v not in self._failed_versions]
        if self.pinned_version is not None:
            return self.pinned_version if self.pinned_version in versions else None
        return versions[-1] if versions else None

    def refresh(self) -> bool:
        with self._lock:
            version = self._wanted_version()
            if version is not None and (self.current is None or self.current.model_version != str(version)):
                try:
                    pair = load_pair(self.models_dir, version)
                    _smoke_test(pair)
                except Exception:  # noqa: BLE001 - a broken version must not take the server down
                    log.exception("model version %s in %s failed to load; keeping the current one",
                                  version, self.models_dir)
                    self._failed_versions.add(version)
                else:
                    # Keep the previous pair so requests that retrieved with it can still rank.
                    previous = self.current
                    self._pairs = {pair.model_version: pair}
                    if previous is not None:
                        self._pairs[previous.model_version] = previous
                    self.current = pair
                    log.info("serving model version %s from %s", version, self.models_dir)
            return self.current is not None

    def is_ready(self) -> bool:
        return self.current is not None

    def not_ready_reason(self) -> str:
        return f"no model loaded yet from {self.models_dir} (expects retrieval/<v>, ranking/<v>, metadata/<v>.json)"

    def current_version(self) -> str | None:
        pair = self.current
        return pair.model_version if pair else None

    def _serving_pair(self) -> LoadedPair:
        pair = self.current
        if pair is None:
            raise ModelsUnavailable(self.not_ready_reason())
        return pair

    def retrieve(self, user_ids: Sequence[str], include_rated: bool, timeout: float | None = None) -> Candidates:
        pair = self._serving_pair()
        outputs = pair.retrieve[include_rated](user_id=tf.constant(user_ids, dtype=tf.string))
        return Candidates(_strings(outputs["item_ids"]), outputs["scores"].numpy(), pair.model_version)

    def rank(self, user_ids: Sequence[str], item_ids: Sequence[str], model_version: str,
             timeout: float | None = None) -> Scores:
        pair = self._pairs.get(model_version)
        if pair is None:
            raise ModelsUnavailable(f"model version {model_version} is no longer loaded; retry")
        outputs = pair.rank(user_id=tf.constant(user_ids, dtype=tf.string),
                            item_id=tf.constant(item_ids, dtype=tf.string))
        return Scores(outputs["predicted_rating"].numpy(), outputs["score"].numpy(), model_version)


def _smoke_test(pair: LoadedPair) -> None:
    """A version is only swapped in once both signatures answer with the expected shapes."""
    probe = tf.constant(["1"])
    for include_rated in (False, True):
        outputs = pair.retrieve[include_rated](user_id=probe)
        if outputs["item_ids"].shape[0] != 1 or outputs["item_ids"].shape != outputs["scores"].shape:
            raise ValueError(f"retrieval returned shapes {outputs['item_ids'].shape}, {outputs['scores'].shape}")
    item_ids = outputs["item_ids"][0, :4]
    scored = pair.rank(user_id=tf.repeat(probe, tf.size(item_ids)), item_id=item_ids)
    if scored["score"].shape != item_ids.shape:
        raise ValueError(f"ranking returned shape {scored['score'].shape} for {item_ids.shape[0]} pairs")
