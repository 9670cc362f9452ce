"""The TF Serving backend: both stages through PredictionService.Predict over gRPC.

Tensors travel as typed repeated fields (strings) or packed tensor_content (floats,
when TF Serving sends them so); all candidates of one request go in one Predict call.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from recsys.server.backend import (
    Backend,
    Candidates,
    Deadline,
    RankedCandidates,
    Scores,
    UserBatch,
    histories,
    remaining,
)
from recsys.server.catalog import Catalog
from recsys.server.errors import BackendMisconfigured, DeadlineExceeded, ModelsUnavailable, Overloaded, RecsysError
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
    metadata_path,
)

log = logging.getLogger("recsys.server")

PROBE_TIMEOUT_SECONDS = 2.0
# Reconnect quickly after TF Serving restarts instead of gRPC's default backoff of up to 2 minutes.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]
_NUMPY_DTYPES = {types_pb2.DT_FLOAT: np.float32, types_pb2.DT_DOUBLE: np.float64,
                 types_pb2.DT_INT32: np.int32, types_pb2.DT_INT64: np.int64}
_VALUE_FIELDS = {types_pb2.DT_FLOAT: "float_val", types_pb2.DT_DOUBLE: "double_val",
                 types_pb2.DT_INT32: "int_val", types_pb2.DT_INT64: "int64_val"}


def _shape(shape: Sequence[int]) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape])


def string_tensor(values: Sequence[str] | np.ndarray) -> tensor_pb2.TensorProto:
    """A string tensor of `values` (a list: one dimension; an array: its shape)."""
    array = np.asarray(values, dtype=object)
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=_shape(array.shape),
                                  string_val=[value.encode() for value in array.ravel().tolist()])


def float_tensor(values: np.ndarray) -> tensor_pb2.TensorProto:
    array = np.ascontiguousarray(values, dtype=np.float32)
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=_shape(array.shape),
                                  tensor_content=array.tobytes())


def user_inputs(request: predict_pb2.PredictRequest, users: UserBatch) -> None:
    """The user side every signature takes (export/serving.py)."""
    request.inputs[USER_ID_INPUT].CopyFrom(string_tensor(users.user_ids))
    request.inputs[INTERACTION_ITEMS_INPUT].CopyFrom(string_tensor(users.interaction_item_ids))
    request.inputs[INTERACTION_RATINGS_INPUT].CopyFrom(float_tensor(users.interaction_ratings))


def to_numpy(proto: tensor_pb2.TensorProto) -> np.ndarray:
    shape = [dim.size for dim in proto.tensor_shape.dim]
    if proto.dtype == types_pb2.DT_STRING:
        return np.array([value.decode() for value in proto.string_val], dtype=object).reshape(shape)
    dtype = _NUMPY_DTYPES.get(proto.dtype)
    if dtype is None:
        raise BackendMisconfigured(f"TF Serving returned an unexpected dtype {types_pb2.DataType.Name(proto.dtype)}")
    if proto.tensor_content:
        return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape)
    return np.asarray(getattr(proto, _VALUE_FIELDS[proto.dtype]), dtype=dtype).reshape(shape)


class TFServingBackend(Backend):
    """Both stages in a TF Serving, always as one pair: the newest version that both models have
    AVAILABLE (ModelService.GetModelStatus) and whose metadata is in `models_dir`.

    TF Serving loads each model's versions on its own (core/aspired_versions_manager.cc), so
    during a rollout retrieval vN can be AVAILABLE seconds before ranking vN, or the reverse;
    a version can fail its warmup and never become AVAILABLE. Pinning both calls to a version
    both models have keeps every call answerable, and the served version switches once the
    whole new pair is there.
    """

    name = "tf-serving"

    def __init__(self, target: str, models_dir: Path, retrieval_model: str = RETRIEVAL_MODEL,
                 ranking_model: str = RANKING_MODEL, retrieval_signature: str = DEFAULT_SIGNATURE,
                 include_rated_signature: str = INCLUDE_RATED_SIGNATURE,
                 ranking_signature: str = DEFAULT_SIGNATURE, model_version: int | None = None,
                 similar_signature: str = SIMILAR_ITEMS_SIGNATURE, explain_signature: str = EXPLAIN_SIGNATURE,
                 rated_items_signature: str = RATED_ITEMS_SIGNATURE):
        self.target = target
        self.models_dir = Path(models_dir)
        self.retrieval_model = retrieval_model
        self.ranking_model = ranking_model
        self.retrieval_signatures = {False: retrieval_signature, True: include_rated_signature}
        self.ranking_signature = ranking_signature
        self.similar_signature = similar_signature
        self.explain_signature = explain_signature
        self.rated_items_signature = rated_items_signature
        self.pinned_version = model_version
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.model_stub = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self._ready = False
        self._last_error = "TF Serving has not been probed yet"
        self._version: str | None = None
        self._checked_signatures: set[str] = set()  # versions whose signatures were found as configured
        self._load_catalog: Callable[[str], Catalog] | None = None

    def _spec(self, model: str, signature: str, version: int | str | None) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=model, signature_name=signature)
        if version is not None:
            spec.version.value = int(version)
        return spec

    def _call(self, method, request, timeout: float | None, what: str):
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as error:
            raise self._translate(error, what) from None

    def _translate(self, error: grpc.RpcError, what: str) -> RecsysError:
        """TF Serving's status as ours. A failed call fails that call only (retryable where a retry
        can help); whether the replica is ready is for the probes (`refresh`) to say. Callers see
        the model and the status; TF Serving's address and its error details stay in the server's log."""
        code, details = error.code(), error.details()
        log.info("TF Serving at %s answered %s for %s: %s", self.target, code.name, what, details)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"deadline exceeded waiting for TF Serving ({what})")
        if code == grpc.StatusCode.NOT_FOUND:  # e.g. the version was unloaded since the last probe
            return ModelsUnavailable(f"TF Serving does not have {what} now; retry")
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
            return BackendMisconfigured(f"TF Serving cannot serve {what} ({code.name})")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Overloaded(f"TF Serving is overloaded ({what}); retry later")
        return ModelsUnavailable(f"TF Serving failed {what} ({code.name}); retry")

    def _available_versions(self, model: str) -> set[int]:
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name=model))
        response = self._call(self.model_stub.GetModelStatus, request, PROBE_TIMEOUT_SECONDS, f"model '{model}'")
        return {status.version for status in response.model_version_status
                if status.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE}

    def _check_signatures(self, version: int) -> None:
        """The configured signatures exist in both models of `version` (once per version)."""
        if str(version) in self._checked_signatures:
            return
        for model, wanted in ((self.retrieval_model, {*self.retrieval_signatures.values(), self.similar_signature,
                                                      self.rated_items_signature}),
                              (self.ranking_model, {self.ranking_signature, self.explain_signature})):
            request = get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec=self._spec(model, "", version), metadata_field=["signature_def"])
            response = self._call(self.stub.GetModelMetadata, request, PROBE_TIMEOUT_SECONDS,
                                  f"model '{model}' version {version}")
            signatures = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(signatures)
            missing = wanted - set(signatures.signature_def)
            if missing:
                raise BackendMisconfigured(f"model '{model}' version {version} in TF Serving has no "
                                           f"signature {', '.join(sorted(missing))}")
        self._checked_signatures.add(str(version))

    def _servable_pair(self, load_catalog: Callable[[str], Catalog]) -> int:
        """The version to serve: AVAILABLE in both models, with metadata that loads, the newest (or the pinned one)."""
        retrieval = self._available_versions(self.retrieval_model)
        ranking = self._available_versions(self.ranking_model)
        both = retrieval & ranking
        if self.pinned_version is not None:
            if self.pinned_version not in both:
                raise ModelsUnavailable(
                    f"pinned version {self.pinned_version} is not AVAILABLE in both models in TF Serving "
                    f"('{self.retrieval_model}': {sorted(retrieval)}, '{self.ranking_model}': {sorted(ranking)})")
            candidates = [self.pinned_version]
        else:
            candidates = sorted((v for v in both if metadata_path(self.models_dir, v).is_file()), reverse=True)
        for version in candidates:
            try:
                load_catalog(str(version))
            except ModelsUnavailable:
                continue  # its metadata is broken (logged): an older complete version may serve
            self._check_signatures(version)
            return version
        raise ModelsUnavailable(
            f"no version is AVAILABLE in both models in TF Serving with usable metadata in the models directory "
            f"('{self.retrieval_model}': {sorted(retrieval)}, '{self.ranking_model}': {sorted(ranking)})")

    def refresh(self, load_catalog: Callable[[str], Catalog]) -> bool:
        """Probe both models' versions: ready when a complete pair is AVAILABLE; learn which one."""
        self._load_catalog = load_catalog  # for the re-probe when a version leaves mid-call
        try:
            version = str(self._servable_pair(load_catalog))
        except RecsysError as error:
            if self._ready or self._version is None or str(error) != self._last_error:
                log.warning("TF Serving at %s not ready: %s", self.target, error)
            self._ready = False
            self._last_error = str(error)
            return False
        if version != self._version or not self._ready:
            log.info("TF Serving at %s ready, serving version %s of '%s' and '%s'", self.target, version,
                     self.retrieval_model, self.ranking_model)
        self._version = version
        self._ready = True
        return True

    def is_ready(self) -> bool:
        return self._ready

    def not_ready_reason(self) -> str:
        return self._last_error

    def current_version(self) -> str | None:
        return self._version

    def _serving_version(self) -> str:
        if self._version is None:
            raise ModelsUnavailable(self._last_error)
        return self._version

    def retrieve(self, users: UserBatch, include_rated: bool, deadline: Deadline | None = None) -> Candidates:
        version = self._serving_version()
        request = predict_pb2.PredictRequest(
            model_spec=self._spec(self.retrieval_model, self.retrieval_signatures[include_rated], version),
            output_filter=["item_ids", "scores"])
        user_inputs(request, users)
        response = self._call(self.stub.Predict, request, remaining(deadline),
                              f"model '{self.retrieval_model}' version {version}")
        return Candidates(to_numpy(response.outputs["item_ids"]).astype(str),
                          to_numpy(response.outputs["scores"]).astype(np.float32), str(response.model_spec.version.value))

    def rank(self, users: UserBatch, item_ids: np.ndarray, model_version: str,
             deadline: Deadline | None = None) -> Scores:
        # Pinned to the version that retrieved: the pair is never mixed.
        request = predict_pb2.PredictRequest(
            model_spec=self._spec(self.ranking_model, self.ranking_signature, model_version),
            output_filter=["predicted_rating", "score"])
        user_inputs(request, users)
        request.inputs[ITEM_IDS_INPUT].CopyFrom(string_tensor(item_ids))
        response = self._call(self.stub.Predict, request, remaining(deadline),
                              f"model '{self.ranking_model}' version {model_version}")
        return Scores(to_numpy(response.outputs["predicted_rating"]).astype(np.float32),
                      to_numpy(response.outputs["score"]).astype(np.float32), str(response.model_spec.version.value))

    def explain(self, users: UserBatch, item_ids: np.ndarray, model_version: str,
                deadline: Deadline | None = None) -> np.ndarray:
        request = predict_pb2.PredictRequest(
            model_spec=self._spec(self.ranking_model, self.explain_signature, model_version),
            output_filter=["because_item_ids"])
        user_inputs(request, users)
        request.inputs[ITEM_IDS_INPUT].CopyFrom(string_tensor(item_ids))
        response = self._call(self.stub.Predict, request, remaining(deadline),
                              f"model '{self.ranking_model}' version {model_version}")
        return to_numpy(response.outputs["because_item_ids"]).astype(str)

    def rated_items(self, user_ids: Sequence[str], model_version: str,
                    deadline: Deadline | None = None) -> list[frozenset[str]]:
        request = predict_pb2.PredictRequest(
            model_spec=self._spec(self.retrieval_model, self.rated_items_signature, model_version),
            output_filter=["item_ids"])
        request.inputs[USER_ID_INPUT].CopyFrom(string_tensor(list(user_ids)))
        response = self._call(self.stub.Predict, request, remaining(deadline),
                              f"model '{self.retrieval_model}' version {model_version}")
        return histories(to_numpy(response.outputs["item_ids"]).astype(str))

    def similar(self, users: UserBatch, item_ids: Sequence[str], deadline: Deadline | None = None) -> Candidates:
        version = self._serving_version()
        request = predict_pb2.PredictRequest(
            model_spec=self._spec(self.retrieval_model, self.similar_signature, version),
            output_filter=["item_ids", "scores"])
        user_inputs(request, users)
        request.inputs[ITEM_ID_INPUT].CopyFrom(string_tensor(list(item_ids)))
        response = self._call(self.stub.Predict, request, remaining(deadline),
                              f"model '{self.retrieval_model}' version {version}")
        return Candidates(to_numpy(response.outputs["item_ids"]).astype(str),
                          to_numpy(response.outputs["scores"]).astype(np.float32), str(response.model_spec.version.value))

    def retrieve_and_rank(self, users: UserBatch, include_rated: bool, deadline: Deadline | None = None,
                          explain_top: int = 0) -> RankedCandidates:
        """Both stages with one version; if TF Serving unloaded it since the last probe (a rollout
        moved on), probe again and run the whole pair once more with the version now served, within
        the same deadline (the two attempts together never take longer)."""
        version = self._serving_version()
        try:
            return super().retrieve_and_rank(users, include_rated, deadline)
        except ModelsUnavailable:
            if not self.refresh(self._load_catalog) or self._version == version:
                raise
            remaining(deadline)  # raises once the time is up
            log.info("version %s left TF Serving mid-call; retrying with version %s", version, self._version)
            return super().retrieve_and_rank(users, include_rated, deadline)

    def close(self) -> None:
        self.channel.close()
