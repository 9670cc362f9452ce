"""The two calls the pipeline needs from any model host, and the in-process host."""
from __future__ import annotations

import abc
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

from server.errors import ModelsUnavailable
from server.layout import (DEFAULT_SIGNATURE, INCLUDE_RATED_SIGNATURE, RANKING_MODEL, RETRIEVAL_MODEL,
                           complete_versions)


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

    @abc.abstractmethod
    def retrieve(self, user_ids: Sequence[str], include_rated: bool, timeout: float | None = None) -> Candidates:
        ...

    @abc.abstractmethod
    def rank(self, user_ids: Sequence[str], item_ids: Sequence[str], model_version: str,
             timeout: float | None = None) -> Scores:
        """Score pairs with the ranking model of `model_version` (the one that retrieved them)."""

    def is_ready(self) -> bool:
        return True

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
    """Runs the exported SavedModels inside this process."""

    def __init__(self, models_dir: Path, model_version: int | None = None):
        self.models_dir = Path(models_dir)
        versions = complete_versions(self.models_dir)
        if model_version is not None:
            versions = [v for v in versions if v == model_version]
        if not versions:
            wanted = f"version {model_version}" if model_version is not None else "any complete version"
            raise ModelsUnavailable(f"{self.models_dir} has no {wanted} (retrieval/<v>, ranking/<v>, metadata/<v>.json)")
        self._pairs: dict[str, LoadedPair] = {}
        self._lock = threading.Lock()
        self.current = self._install(load_pair(self.models_dir, versions[-1]))

    def _install(self, pair: LoadedPair) -> LoadedPair:
        with self._lock:
            self._pairs[pair.model_version] = pair
            self.current = pair
            return pair

    def _pair(self, model_version: str) -> LoadedPair:
        pair = self._pairs.get(model_version)
        if pair is None:
            raise ModelsUnavailable(f"model version {model_version} is no longer loaded; retry")
        return pair

    def retrieve(self, user_ids: Sequence[str], include_rated: bool, timeout: float | None = None) -> Candidates:
        pair = self.current
        outputs = pair.retrieve[include_rated](user_id=tf.constant(user_ids, dtype=tf.string))
        return Candidates(_strings(outputs["item_ids"]), outputs["scores"].numpy(), pair.model_version)

    def rank(self, user_ids: Sequence[str], item_ids: Sequence[str], model_version: str,
             timeout: float | None = None) -> Scores:
        outputs = self._pair(model_version).rank(user_id=tf.constant(user_ids, dtype=tf.string),
                                                 item_id=tf.constant(item_ids, dtype=tf.string))
        return Scores(outputs["predicted_rating"].numpy(), outputs["score"].numpy(), model_version)
