"""A stand-in for the tensorflow_model_server binary (which cannot run here).

It speaks the real tensorflow.serving.PredictionService protocol and loads each model
the way TF Serving does: versions from the model's base path (latest unless
model_spec.version pins one), the SavedModel through the TF1 loader into a Session,
the signature from model_spec.signature_name, session.run on the signature's tensors.
"""
from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path

import grpc
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2


class _LoadedModel:
    def __init__(self, path: Path):
        self.graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=self.graph)
        with self.graph.as_default():
            meta_graph = tf.compat.v1.saved_model.loader.load(self.session, ["serve"], str(path))
        self.signatures = dict(meta_graph.signature_def)


class TFServingDouble(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, model_config_file: Path):
        config = text_format.Parse(Path(model_config_file).read_text(), model_server_config_pb2.ModelServerConfig())
        self.base_paths = {entry.name: Path(entry.base_path) for entry in config.model_config_list.config}
        self._loaded: dict[tuple[str, int], _LoadedModel] = {}
        self._lock = threading.Lock()
        self.predict_calls = 0

    def _model(self, spec, context) -> tuple[_LoadedModel, int]:
        base = self.base_paths.get(spec.name)
        if base is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name})")
        versions = sorted(int(p.name) for p in base.iterdir() if p.name.isdigit() and (p / "saved_model.pb").exists())
        if spec.HasField("version"):
            version = spec.version.value
            if version not in versions:
                context.abort(grpc.StatusCode.NOT_FOUND,
                              f"Servable not found for request: Specific({spec.name}, {version})")
        elif versions:
            version = versions[-1]
        else:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name})")
        with self._lock:
            if (spec.name, version) not in self._loaded:
                self._loaded[(spec.name, version)] = _LoadedModel(base / str(version))
        return self._loaded[(spec.name, version)], version

    @staticmethod
    def _signature(model: _LoadedModel, name: str, context):
        name = name or "serving_default"
        if name not in model.signatures:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Serving signature name: \"{name}\" not found in signature def")
        return model.signatures[name]

    def Predict(self, request, context):
        self.predict_calls += 1
        model, version = self._model(request.model_spec, context)
        signature = self._signature(model, request.model_spec.signature_name, context)
        if set(request.inputs) != set(signature.inputs):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"input keys {sorted(request.inputs)} do not match signature {sorted(signature.inputs)}")
        feeds = {signature.inputs[key].name: tf.make_ndarray(tensor) for key, tensor in request.inputs.items()}
        output_keys = list(request.output_filter) or list(signature.outputs)
        fetched = model.session.run([signature.outputs[key].name for key in output_keys], feed_dict=feeds)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.signature_name = request.model_spec.signature_name or "serving_default"
        response.model_spec.version.value = version
        for key, value in zip(output_keys, fetched):
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    def GetModelMetadata(self, request, context):
        model, version = self._model(request.model_spec, context)
        if list(request.metadata_field) != ["signature_def"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Metadata field signature_def is the only one supported")
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature in model.signatures.items():
            signature_map.signature_def[name].CopyFrom(signature)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = version
        response.metadata["signature_def"].Pack(signature_map)
        return response


def start_tf_serving_double(model_config_file: Path, port: int = 0) -> tuple[grpc.Server, int, TFServingDouble]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    servicer = TFServingDouble(model_config_file)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, bound, servicer
