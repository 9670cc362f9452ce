"""A stand-in for `tensorflow_model_server`, which cannot run here, built on TensorFlow's C API.

Each rule below reproduces TF Serving's behaviour and names the source file it comes from
(github.com/tensorflow/serving):
- `model_servers/server_core.cc`: the models of a `ModelServerConfig` file, each with its own
  base path, version policy (`latest` N, `all`, `specific`) and version labels;
- `sources/storage_path/file_system_storage_path_source.cc`: base paths are polled every
  `--file_system_poll_wait_seconds` for numeric version directories;
- `core/basic_manager.cc`, `core/aspired_versions_manager.cc` with the availability-preserving
  policy: every aspired version loads eagerly, each model on its own (so one model's vN can be
  AVAILABLE while another's is still loading or missing); an old version is unloaded only once
  a newer aspired one is AVAILABLE; a version whose load fails ends in state END with the error
  and is not served;
- `servables/tensorflow/saved_model_warmup_util.cc`: `assets.extra/tf_serving_warmup_requests`
  is replayed before a version becomes AVAILABLE (optional; at most 1,000 records; any failing
  record fails the load);
- `servables/tensorflow/predict_util.cc`: Predict (signature, inputs, output filter, outputs as
  typed proto fields), with TensorFlow's own status codes passed through;
- `servables/tensorflow/get_model_metadata_impl.cc` and `model_servers/get_model_status_impl.cc`.

What it does not reproduce: request batching, the REST API, monitoring, and CRC checks of the
warmup file's records.
"""
from __future__ import annotations

import logging
import struct
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import text_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from tests.tf_serving.c_api import SavedModelSession, TFError

log = logging.getLogger("tf_serving_standin")

DEFAULT_SIGNATURE = "serving_default"
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000
CODES = {code.value[0]: code for code in grpc.StatusCode}
State = get_model_status_pb2.ModelVersionStatus.State


class ServingError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _from_tf(error: TFError) -> ServingError:
    return ServingError(CODES.get(error.code, grpc.StatusCode.UNKNOWN), str(error))


@dataclass
class Servable:
    """One version of one model and where it is in its lifecycle (basic_manager.cc's states)."""

    name: str
    version: int
    path: Path
    state: int = State.START
    error: ServingError | None = None
    session: SavedModelSession | None = None

    @property
    def signatures(self):
        return self.session.meta_graph.signature_def


def _warmup_records(path: Path) -> list[bytes]:
    """The TFRecord file's records: [length u64][crc u32][data][crc u32] each."""
    data, records, offset = path.read_bytes(), [], 0
    while offset < len(data):
        if offset + 12 > len(data):
            raise ServingError(grpc.StatusCode.DATA_LOSS, f"truncated record at {path}. Please verify your warmup "
                                                          "data is in TFRecord format.")
        (length,) = struct.unpack_from("<Q", data, offset)
        records.append(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        if len(records) > MAX_WARMUP_RECORDS:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}")
    return records


def run_predict(servable: Servable, request: predict_pb2.PredictRequest,
                timeout_seconds: float | None = None) -> predict_pb2.PredictResponse:
    """predict_util.cc's RunPredict: signature, inputs, output filter, Session::Run, outputs."""
    signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    if signature_name not in servable.signatures:
        raise ServingError(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.')
    signature = servable.signatures[signature_name]
    sent, wanted = set(request.inputs), set(signature.inputs)
    if len(sent) > len(wanted) or len(sent) < len(wanted) and not signature.defaults:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, (
            f"input size does not match signature: {len(sent)}!={len(wanted)} len({{{','.join(sorted(sent))}}}) != "
            f"len({{{','.join(sorted(wanted))}}}). Sent extra: {{{','.join(sorted(sent - wanted))}}}. "
            f"Missing but required: {{{','.join(sorted(wanted - sent))}}}."))
    feeds = {}
    for alias, info in signature.inputs.items():  # tensorflow/cc/saved_model/util.cc: GetInputValues
        if alias not in request.inputs:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Signature input alias: {alias}(feed name: {info.name}) not found in request and no "
                               "default value provided.")
        feeds[info.name] = request.inputs[alias]
    aliases = list(request.output_filter)
    for alias in aliases:
        if alias not in signature.outputs:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, (
                f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                f"{{{','.join(sorted(signature.outputs))}}}."))
    if len(set(aliases)) != len(aliases):
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"duplicate output tensor alias: {aliases}")
    aliases = aliases or list(signature.outputs)
    timeout_ms = None if timeout_seconds is None else max(1, int(timeout_seconds * 1000))
    try:
        outputs = servable.session.run(feeds, [signature.outputs[alias].name for alias in aliases], timeout_ms)
    except TFError as error:
        raise _from_tf(error) from None
    response = predict_pb2.PredictResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.signature_name = signature_name
    response.model_spec.version.value = servable.version
    for alias, proto in zip(aliases, outputs):
        response.outputs[alias].CopyFrom(proto)
    return response


@dataclass
class ModelEntry:
    """One model of the config file: its versions, and the thread that loads them one after another."""

    config: model_server_config_pb2.ModelConfig
    servables: dict[int, Servable] = field(default_factory=dict)
    loader: futures.ThreadPoolExecutor = field(
        default_factory=lambda: futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader"))
    pending: list[futures.Future] = field(default_factory=list)

    def aspired(self) -> list[int]:
        """The versions on disk the model's version policy keeps (file_system_storage_path_source.cc)."""
        base = Path(self.config.base_path)
        on_disk = sorted(int(p.name) for p in base.iterdir() if p.name.isdigit()) if base.is_dir() else []
        policy = self.config.model_version_policy
        kind = policy.WhichOneof("policy_choice")
        if kind == "all":
            return on_disk
        if kind == "specific":
            return [version for version in on_disk if version in set(policy.specific.versions)]
        latest = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions else 1
        return on_disk[-latest:]


class ModelManager:
    def __init__(self, config_file: Path, enable_warmup: bool = True, intra_op_threads: int = 0,
                 inter_op_threads: int = 0):
        config = text_format.Parse(Path(config_file).read_text(), model_server_config_pb2.ModelServerConfig())
        self.models = {entry.name: ModelEntry(entry) for entry in config.model_config_list.config}
        self.enable_warmup = enable_warmup
        self.threads = (intra_op_threads, inter_op_threads)
        self._lock = threading.Lock()

    def poll(self) -> None:
        """Load newly aspired versions; unload those no longer aspired once a newer one is AVAILABLE."""
        for entry in self.models.values():
            aspired = entry.aspired()
            with self._lock:
                for version in aspired:
                    if version not in entry.servables:
                        servable = Servable(entry.config.name, version, Path(entry.config.base_path) / str(version))
                        entry.servables[version] = servable
                        entry.pending.append(entry.loader.submit(self._load, servable))
                available = [v for v in aspired if entry.servables[v].state == State.AVAILABLE]
                for version, servable in list(entry.servables.items()):
                    if version not in aspired and (available or not aspired):
                        self._unload(entry, servable)

    def wait_for_loads(self) -> None:
        for entry in self.models.values():
            futures.wait(entry.pending)

    def _load(self, servable: Servable) -> None:
        servable.state = State.LOADING
        try:
            session = SavedModelSession(servable.path, *self.threads)
        except TFError as error:
            self._fail(servable, _from_tf(error))
            return
        servable.session = session
        try:
            warmup = servable.path / WARMUP_FILE
            if self.enable_warmup and warmup.is_file():
                for record in _warmup_records(warmup):
                    entry = prediction_log_pb2.PredictionLog.FromString(record)
                    if entry.WhichOneof("log_type") != "predict_log":
                        raise ServingError(grpc.StatusCode.UNIMPLEMENTED, "only predict_log warmup records are supported")
                    run_predict(servable, entry.predict_log.request)
        except ServingError as error:
            session.close()
            servable.session = None
            self._fail(servable, error)
            return
        servable.state = State.AVAILABLE
        log.info("Successfully loaded servable version {name: %s version: %d}", servable.name, servable.version)

    def _fail(self, servable: Servable, error: ServingError) -> None:
        servable.error, servable.state = error, State.END
        log.error("Loading servable: {name: %s version: %d} failed: %s", servable.name, servable.version, error)

    def _unload(self, entry: ModelEntry, servable: Servable) -> None:
        del entry.servables[servable.version]
        if servable.session is not None:
            servable.state = State.UNLOADING
            session, servable.session = servable.session, None
            session.close()
        servable.state = State.END

    def servable(self, spec) -> Servable:
        """server_core.cc's servable lookup: a pinned version, a version label, else the latest AVAILABLE."""
        entry = self.models.get(spec.name)
        if entry is None:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name})")
        with self._lock:
            available = {v: s for v, s in entry.servables.items() if s.state == State.AVAILABLE}
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            labels = entry.config.version_labels
            if spec.version_label not in labels:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"Unrecognized servable version label: {spec.version_label}")
            version = labels[spec.version_label]
        elif choice == "version":
            version = spec.version.value
        else:
            if not available:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name})")
            return available[max(available)]
        if version not in available:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: Specific({spec.name}, {version})")
        return available[version]

    def status(self, spec) -> list[get_model_status_pb2.ModelVersionStatus]:
        """get_model_status_impl.cc: every version the manager knows, or the one asked for."""
        entry = self.models.get(spec.name)
        with self._lock:
            servables = dict(entry.servables) if entry else {}
        if not servables:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}")
        if spec.HasField("version"):
            if spec.version.value not in servables:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"Could not find version {spec.version.value} of model {spec.name}")
            servables = {spec.version.value: servables[spec.version.value]}
        statuses = []
        for version, servable in sorted(servables.items()):
            status = get_model_status_pb2.ModelVersionStatus(version=version, state=servable.state)
            if servable.error is not None:
                status.status.error_code = servable.error.code.value[0]
                status.status.error_message = str(servable.error)
            statuses.append(status)
        return statuses


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    def Predict(self, request, context):
        try:
            return run_predict(self.manager.servable(request.model_spec), request, context.time_remaining())
        except ServingError as error:
            context.abort(error.code, str(error))

    def GetModelMetadata(self, request, context):
        """get_model_metadata_impl.cc: only the signature_def field, for a servable that is AVAILABLE."""
        try:
            if not request.metadata_field:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "GetModelMetadataRequest must specify at least one metadata_field")
            for name in request.metadata_field:
                if name != "signature_def":
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {name} is not supported")
            servable = self.manager.servable(request.model_spec)
        except ServingError as error:
            context.abort(error.code, str(error))
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature in servable.signatures.items():
            signature_map.signature_def[name].CopyFrom(signature)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(signature_map)
        return response


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, manager: ModelManager):
        self.manager = manager

    def GetModelStatus(self, request, context):
        try:
            return get_model_status_pb2.GetModelStatusResponse(
                model_version_status=self.manager.status(request.model_spec))
        except ServingError as error:
            context.abort(error.code, str(error))
