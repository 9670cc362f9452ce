"""The in-process model host: the exported SavedModels loaded and run inside the server."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from recsys.server.backend import Backend, Candidates, Deadline, RankedCandidates, Scores, UserBatch, histories
from recsys.server.catalog import Catalog
from recsys.server.errors import ModelsUnavailable
from recsys.server.layout import (
    DEFAULT_SIGNATURE,
    EXPLAIN_SIGNATURE,
    INCLUDE_RATED_SIGNATURE,
    INTERACTION_ITEMS_INPUT,
    INTERACTION_RATINGS_INPUT,
    ITEM_ID_INPUT,
    ITEM_IDS_INPUT,
    RANKING_MODEL,
    RATED_ITEMS_SIGNATURE,
    RETRIEVAL_MODEL,
    SIMILAR_ITEMS_SIGNATURE,
    USER_ID_INPUT,
    WARMUP_FILE,
    complete_versions,
)
from recsys.server.options import DEFAULTS

log = logging.getLogger("recsys.server")


def _strings(tensor: tf.Tensor) -> np.ndarray:
    return tensor.numpy().astype(str)


@dataclass(frozen=True)
class LoadedPair:
    model_version: str
    retrieve: dict[bool, object]  # include_rated -> concrete signature function
    rank: object
    explain: object
    similar: object
    rated_items: object
    item_ids: frozenset[str]  # every movie the retrieval index can return
    # include_rated -> one tf.function running the signatures: a request costs one TF call.
    retrieve_and_rank: dict[bool, FlatCall]
    explains: bool  # whether retrieve_and_rank also explains (takes and honours explain_top)
    signatures: dict[tuple[str, str], object]  # (model, signature name) -> function, for warmup
    saved_models: tuple[object, object]  # retrieval, ranking: they own the variables the functions use


def _user_inputs(users: UserBatch) -> dict[str, tf.Tensor]:
    return {USER_ID_INPUT: tf.constant(users.user_ids, dtype=tf.string),
            INTERACTION_ITEMS_INPUT: tf.constant(users.interaction_item_ids, dtype=tf.string),
            INTERACTION_RATINGS_INPUT: tf.constant(users.interaction_ratings, dtype=tf.float32)}


def fuse(retrieve, rank, explain=None):
    """retrieve, rank every candidate, then (with `explain`) explain the best `explain_top` of each
    user, in one graph: the signatures exactly as exported.

    The best are taken by score as the pipeline orders them (ties in retrieval order, movies the
    model excluded last), so a list of k items with E exclusions is covered by k + E. Returned as
    a `FlatCall` of the traced function.
    """

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([None, None], tf.string),
                                  tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([], tf.int32)])
    def retrieve_and_rank(user_id: tf.Tensor, interaction_item_ids: tf.Tensor, interaction_ratings: tf.Tensor,
                          explain_top: tf.Tensor) -> dict[str, tf.Tensor]:
        users = {USER_ID_INPUT: user_id, INTERACTION_ITEMS_INPUT: interaction_item_ids,
                 INTERACTION_RATINGS_INPUT: interaction_ratings}
        candidates = retrieve(**users)
        ranked = rank(**users, **{ITEM_IDS_INPUT: candidates["item_ids"]})
        outputs = {"item_ids": candidates["item_ids"], "retrieval_scores": candidates["scores"],
                   "score": ranked["score"], "predicted_rating": ranked["predicted_rating"]}
        if explain is not None:
            score = tf.where(candidates["scores"] > float("-inf"), ranked["score"], float("-inf"))
            best = tf.math.top_k(score, k=tf.minimum(explain_top, tf.shape(score)[1])).indices
            outputs["explained_item_ids"] = tf.gather(candidates["item_ids"], best, batch_dims=1)
            outputs["because_item_ids"] = explain(
                **users, **{ITEM_IDS_INPUT: outputs["explained_item_ids"]})["because_item_ids"]
        return outputs

    return FlatCall(retrieve_and_rank.get_concrete_function())


class FlatCall:
    """A traced function called with its positional tensors in signature order, returning its dict.

    Calling the concrete function itself binds the arguments to its signature and flattens them
    on every call, in Python; this hands them to the function's inference graph as they are, a
    measurable share of a lone request's time (docs/performance.md).
    """

    def __init__(self, concrete: Any):
        self.concrete = concrete  # owns the graph the call runs: kept alive with this object
        self._call = concrete.inference_fn.call_flat
        self._captured = list(concrete.captured_inputs)  # the variables' handles, appended to every call
        self._outputs = concrete.structured_outputs

    def __call__(self, *inputs: tf.Tensor) -> dict[str, tf.Tensor]:
        return tf.nest.pack_sequence_as(self._outputs, self._call(*inputs, *self._captured), expand_composites=True)


def load_pair(models_dir: Path, version: int, explains: bool = True) -> LoadedPair:
    """`explains`: fuse the reasons into the one call (the server does when it gives reasons)."""
    retrieval = tf.saved_model.load(str(models_dir / RETRIEVAL_MODEL / str(version)))
    ranking = tf.saved_model.load(str(models_dir / RANKING_MODEL / str(version)))
    signatures = {(RETRIEVAL_MODEL, name): fn for name, fn in retrieval.signatures.items()}
    signatures.update({(RANKING_MODEL, name): fn for name, fn in ranking.signatures.items()})
    retrieve = {False: retrieval.signatures[DEFAULT_SIGNATURE], True: retrieval.signatures[INCLUDE_RATED_SIGNATURE]}
    rank = ranking.signatures[DEFAULT_SIGNATURE]
    return LoadedPair(
        model_version=str(version),
        retrieve=retrieve,
        rank=rank,
        explain=ranking.signatures[EXPLAIN_SIGNATURE],
        similar=retrieval.signatures[SIMILAR_ITEMS_SIGNATURE],
        rated_items=retrieval.signatures[RATED_ITEMS_SIGNATURE],
        retrieve_and_rank={include_rated: fuse(function, rank, ranking.signatures[EXPLAIN_SIGNATURE] if explains else None)
                           for include_rated, function in retrieve.items()},
        explains=explains,
        signatures=signatures,
        saved_models=(retrieval, ranking),
        item_ids=frozenset(retrieval.item_ids.numpy().astype(str).tolist()),
    )


def warm_up(models_dir: Path, pair: LoadedPair) -> int:
    """Replay each model's assets.extra warmup requests (as TF Serving does); return how many ran.

    A version is only swapped in once every request answers with one row per input.
    """
    replayed = 0
    for model in (RETRIEVAL_MODEL, RANKING_MODEL):
        path = models_dir / model / pair.model_version / "assets.extra" / WARMUP_FILE
        for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
            function = pair.signatures[(model, request.model_spec.signature_name or DEFAULT_SIGNATURE)]
            inputs = {key: tf.constant(tf.make_ndarray(proto), dtype=tf.dtypes.as_dtype(proto.dtype))
                      for key, proto in request.inputs.items()}
            outputs = function(**inputs)
            rows = int(inputs[USER_ID_INPUT].shape[0])
            if any(tensor.shape[0] != rows for tensor in outputs.values()):
                raise ValueError(f"{model} warmup request answered with the wrong batch size")
            replayed += 1
    if not replayed:
        raise ValueError(f"version {pair.model_version} has no warmup requests")
    for function in pair.retrieve_and_rank.values():  # the fused call's first runs, before it serves
        movie = min(pair.item_ids)
        for users in (UserBatch.of(["warmup"]), UserBatch.of(["warmup"], [[(movie, 4.0)]])):
            function(*_user_inputs(users).values(), tf.constant(10))
    return replayed


def set_tensorflow_threads(intra_op: int = DEFAULTS.tensorflow_intra_op_parallelism,
                           inter_op: int = DEFAULTS.tensorflow_inter_op_parallelism) -> tuple[int, int]:
    """Size TensorFlow's thread pools (0: one thread per core); returns the sizes in effect.

    Only possible before TensorFlow runs its first op: after that (a process that already
    trained or served) the pools stay as they are, and the returned sizes say so.

    One request's model call is small (a 1,682 x 64 matrix product, an MLP over 200
    candidates): splitting its ops over threads costs more than it saves, and the pools'
    idle threads spin on cores the gRPC event loop needs. TF Serving has the same two knobs
    (--tensorflow_intra_op_parallelism, --tensorflow_inter_op_parallelism).
    """
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:  # "cannot be modified after initialization"
        pass
    return (tf.config.threading.get_intra_op_parallelism_threads(),
            tf.config.threading.get_inter_op_parallelism_threads())


# A version that failed to load is tried again after this long, doubling up to the maximum:
# it may still have been copying, or the machine short of memory.
RETRY_SECONDS = 5.0
MAX_RETRY_SECONDS = 300.0
# With nothing to serve, the warning saying so is repeated this often.
NOTHING_TO_SERVE_WARNING_SECONDS = 60.0


def check_consistency(pair: LoadedPair, catalog: Catalog) -> None:
    """Every movie the retrieval index can return is in the catalog (synthetic benchmark movies aside)."""
    unknown = [item for item in pair.item_ids - catalog.titles.keys()
               if not (catalog.synthetic_items and item.startswith("synthetic-"))]
    if unknown:
        raise ValueError(f"version {pair.model_version}: {len(unknown)} movies of the retrieval index are missing "
                         f"from its metadata, e.g. {sorted(unknown)[:3]}")


class InProcessBackend(Backend):
    """Runs the exported SavedModels inside this process.

    `refresh()` parses the newest complete version's metadata (or the pinned one's), loads its
    models next to the ones serving, replays its warmup requests, checks the metadata against the
    models, and only then swaps it in, in one assignment (TF Serving's availability-preserving policy,
    core/aspired_versions_manager.cc). A version that fails any step is logged, counted and
    tried again with backoff; the serving version goes on serving. The swapped-out pair is
    released at once: a request still running holds its own reference until it ends.
    """

    name = "in-process"
    in_process = True

    def __init__(self, models_dir: Path, model_version: int | None = None, explains: bool = DEFAULTS.reasons):
        """`explains`: explain each user's best movies in the same call as ranking them (what a pipeline
        with reasons asks); without, reasons take a call of their own (`explain`)."""
        self.models_dir = Path(models_dir)
        self.pinned_version = model_version
        self.explains = explains
        self.current: LoadedPair | None = None
        self._retry_at: dict[int, tuple[float, float]] = {}  # failed version -> (when to retry, backoff)
        self._warned_at = -NOTHING_TO_SERVE_WARNING_SECONDS
        self._lock = threading.Lock()

    def _wanted_version(self) -> int | None:
        now = time.monotonic()
        versions = [v for v in complete_versions(self.models_dir) if self._retry_at.get(v, (0.0, 0.0))[0] <= now]
        if self.pinned_version is not None:
            return self.pinned_version if self.pinned_version in versions else None
        return versions[-1] if versions else None

    def _warn_nothing_to_serve(self) -> None:
        """As TF Serving does ("No versions of servable found under base path"): say what the models
        directory lacks, once every NOTHING_TO_SERVE_WARNING_SECONDS until a version loads."""
        now = time.monotonic()
        if now < self._warned_at + NOTHING_TO_SERVE_WARNING_SECONDS:
            return
        self._warned_at = now
        what = "does not exist" if not self.models_dir.is_dir() else "holds no complete version"
        pinned = f" (version {self.pinned_version} pinned)" if self.pinned_version is not None else ""
        log.warning("nothing to serve: %s %s%s; a version needs retrieval/<v>, ranking/<v> and metadata/<v>.json "
                    "(python -m recsys.export train --out %s)", self.models_dir, what, pinned, self.models_dir)

    def refresh(self, load_catalog: Callable[[str], Catalog]) -> bool:
        with self._lock:
            version = self._wanted_version()
            if version is None and self.current is None:
                self._warn_nothing_to_serve()
            if version is not None and (self.current is None or self.current.model_version != str(version)):
                try:
                    # The metadata first: a broken file then costs a parse per retry, not a load and
                    # warmup of both graphs (seconds, and a second version's memory, at catalog size).
                    catalog = load_catalog(str(version))
                    pair = load_pair(self.models_dir, version, self.explains)
                    warm_up(self.models_dir, pair)
                    check_consistency(pair, catalog)
                except Exception as error:  # noqa: BLE001 - a broken version must not take the server down
                    backoff = min(MAX_RETRY_SECONDS, 2 * self._retry_at.get(version, (0.0, RETRY_SECONDS / 2))[1])
                    self._retry_at[version] = (time.monotonic() + backoff, backoff)
                    self.load_failures += 1
                    log.warning("model version %s in %s failed to load (%s: %s); keeping the current one, "
                                "retrying in %.0f s", version, self.models_dir, type(error).__name__, error, backoff)
                else:
                    self._retry_at.pop(version, None)
                    self.current = pair
                    log.info("serving model version %s from %s", version, self.models_dir)
            return self.current is not None

    def is_ready(self) -> bool:
        return self.current is not None

    def not_ready_reason(self) -> str:
        return "no model version has loaded yet (the models directory needs retrieval/<v>, ranking/<v>, metadata/<v>.json)"

    def current_version(self) -> str | None:
        pair = self.current
        return pair.model_version if pair else None

    def _serving_pair(self) -> LoadedPair:
        pair = self.current
        if pair is None:
            raise ModelsUnavailable(self.not_ready_reason())
        return pair

    def retrieve(self, users: UserBatch, include_rated: bool, deadline: Deadline | None = None) -> Candidates:
        pair = self._serving_pair()
        outputs = pair.retrieve[include_rated](**_user_inputs(users))
        return Candidates(_strings(outputs["item_ids"]), outputs["scores"].numpy(), pair.model_version)

    def retrieve_and_rank(self, users: UserBatch, include_rated: bool, deadline: Deadline | None = None,
                          explain_top: int = 0) -> RankedCandidates:
        pair = self._serving_pair()
        with (deadline or Deadline()).stage("models"):  # one graph: the stages cannot be timed apart
            outputs = pair.retrieve_and_rank[include_rated](*_user_inputs(users).values(), tf.constant(explain_top))
        explained = pair.explains and explain_top > 0
        return RankedCandidates(_strings(outputs["item_ids"]), outputs["retrieval_scores"].numpy(),
                                outputs["score"].numpy(), outputs["predicted_rating"].numpy(), pair.model_version,
                                _strings(outputs["explained_item_ids"]) if explained else None,
                                _strings(outputs["because_item_ids"]) if explained else None)

    def _pair_of(self, model_version: str) -> LoadedPair:
        pair = self._serving_pair()
        if pair.model_version != model_version:
            raise ModelsUnavailable(f"model version {model_version} is no longer loaded; retry")
        return pair

    def rank(self, users: UserBatch, item_ids: np.ndarray, model_version: str,
             deadline: Deadline | None = None) -> Scores:
        outputs = self._pair_of(model_version).rank(**_user_inputs(users),
                                                    **{ITEM_IDS_INPUT: tf.constant(item_ids, dtype=tf.string)})
        return Scores(outputs["predicted_rating"].numpy(), outputs["score"].numpy(), model_version)

    def explain(self, users: UserBatch, item_ids: np.ndarray, model_version: str,
                deadline: Deadline | None = None) -> np.ndarray:
        outputs = self._pair_of(model_version).explain(**_user_inputs(users),
                                                       **{ITEM_IDS_INPUT: tf.constant(item_ids, dtype=tf.string)})
        return _strings(outputs["because_item_ids"])

    def rated_items(self, user_ids: Sequence[str], model_version: str,
                    deadline: Deadline | None = None) -> list[frozenset[str]]:
        outputs = self._pair_of(model_version).rated_items(**{USER_ID_INPUT: tf.constant(list(user_ids), dtype=tf.string)})
        return histories(_strings(outputs["item_ids"]))

    def similar(self, users: UserBatch, item_ids: Sequence[str], deadline: Deadline | None = None) -> Candidates:
        pair = self._serving_pair()
        outputs = pair.similar(**_user_inputs(users), **{ITEM_ID_INPUT: tf.constant(list(item_ids), dtype=tf.string)})
        return Candidates(_strings(outputs["item_ids"]), outputs["scores"].numpy(), pair.model_version)
