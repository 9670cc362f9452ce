"""The TF Serving backend: both stages through PredictionService.Predict over gRPC.

Tensors travel as typed repeated fields (strings) or packed tensor_content (floats,
when TF Serving sends them so); all candidates of one request go in one Predict call.
"""
from __future__ import annotations

import logging
import threading
from typing import Sequence

import grpc
import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, model_pb2, predict_pb2, prediction_service_pb2_grpc

from server.backend import Backend, Candidates, Scores
from server.errors import BackendMisconfigured, DeadlineExceeded, ModelsUnavailable, Overloaded, RecsysError
from server.layout import DEFAULT_SIGNATURE, INCLUDE_RATED_SIGNATURE, RANKING_MODEL, RETRIEVAL_MODEL

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


def string_tensor(values: Sequence[str]) -> tensor_pb2.TensorProto:
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(values))]),
        string_val=[value.encode() for value in values])


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
    name = "tf-serving"

    def __init__(self, target: str, retrieval_model: str = RETRIEVAL_MODEL, ranking_model: str = RANKING_MODEL,
                 retrieval_signature: str = DEFAULT_SIGNATURE,
                 include_rated_signature: str = INCLUDE_RATED_SIGNATURE,
                 ranking_signature: str = DEFAULT_SIGNATURE, model_version: int | None = None):
        self.target = target
        self.retrieval_model = retrieval_model
        self.ranking_model = ranking_model
        self.retrieval_signatures = {False: retrieval_signature, True: include_rated_signature}
        self.ranking_signature = ranking_signature
        self.pinned_version = model_version
        self.channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self._ready = False
        self._last_error = f"TF Serving at {target} has not been probed yet"
        self._version: str | None = None
        self._lock = threading.Lock()

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
        code, details = error.code(), error.details()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"deadline exceeded waiting for TF Serving ({what})")
        if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
            return BackendMisconfigured(f"TF Serving at {self.target} cannot serve {what}: {code.name}: {details}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return Overloaded(f"TF Serving at {self.target} is overloaded ({what}): {details}")
        # Unreachable or failing: not ready until a probe succeeds again.
        self._ready = False
        self._last_error = f"TF Serving at {self.target} is unavailable: {code.name}: {details}"
        return ModelsUnavailable(f"TF Serving at {self.target} is unavailable ({what}): {code.name}: {details}")

    def refresh(self) -> bool:
        """Probe both models' metadata: ready when both answer; learn the version being served."""
        try:
            versions = []
            for model, signature in ((self.retrieval_model, self.retrieval_signatures[False]),
                                     (self.ranking_model, self.ranking_signature)):
                request = get_model_metadata_pb2.GetModelMetadataRequest(
                    model_spec=self._spec(model, signature, self.pinned_version), metadata_field=["signature_def"])
                response = self._call(self.stub.GetModelMetadata, request, PROBE_TIMEOUT_SECONDS, f"model '{model}'")
                versions.append(response.model_spec.version.value)
        except RecsysError as error:
            if self._ready or self._version is None:
                log.warning("TF Serving not ready: %s", error)
            self._ready = False
            self._last_error = str(error)
            return False
        self._version = str(versions[0])
        if not self._ready:
            log.info("TF Serving at %s ready, retrieval version %s", self.target, self._version)
        self._ready = True
        return True

    def is_ready(self) -> bool:
        return self._ready

    def not_ready_reason(self) -> str:
        return self._last_error

    def current_version(self) -> str | None:
        return self._version

    def retrieve(self, user_ids: Sequence[str], include_rated: bool, timeout: float | None = None) -> Candidates:
        request = predict_pb2.PredictRequest(
            model_spec=self._spec(self.retrieval_model, self.retrieval_signatures[include_rated], self.pinned_version),
            output_filter=["item_ids", "scores"])
        request.inputs["user_id"].CopyFrom(string_tensor(list(user_ids)))
        response = self._call(self.stub.Predict, request, timeout, f"model '{self.retrieval_model}'")
        version = str(response.model_spec.version.value)
        self._version = version
        return Candidates(to_numpy(response.outputs["item_ids"]).astype(str),
                          to_numpy(response.outputs["scores"]).astype(np.float32), version)

    def rank(self, user_ids: Sequence[str], item_ids: Sequence[str], model_version: str,
             timeout: float | None = None) -> Scores:
        # Pin ranking to the version that retrieved: the pair is never mixed mid-rollout.
        request = predict_pb2.PredictRequest(
            model_spec=self._spec(self.ranking_model, self.ranking_signature, model_version),
            output_filter=["predicted_rating", "score"])
        request.inputs["user_id"].CopyFrom(string_tensor(list(user_ids)))
        request.inputs["item_id"].CopyFrom(string_tensor(list(item_ids)))
        response = self._call(self.stub.Predict, request, timeout,
                              f"model '{self.ranking_model}' version {model_version}")
        return Scores(to_numpy(response.outputs["predicted_rating"]).astype(np.float32),
                      to_numpy(response.outputs["score"]).astype(np.float32), str(response.model_spec.version.value))

    def close(self) -> None:
        self.channel.close()
