"""TensorFlow's C API through ctypes: load a SavedModel with the C++ loader and run its signatures.

`TF_LoadSessionFromSavedModel` is the C entry to `tensorflow::LoadSavedModel`, the loader TF
Serving's `SavedModelBundleFactory` calls (tensorflow_serving/servables/tensorflow/
saved_model_bundle_factory.cc). Requests' TensorProtos become tensors through
`TF_TensorFromProto` (`Tensor::FromProto`, as TF Serving's `GetInputValues` does); outputs are
written back as typed proto fields (`Tensor::AsProtoField`: `float_val`, `string_val`, ...).

Both libraries are opened with RTLD_LOCAL: with RTLD_GLOBAL, the SSL symbols bundled in
libtensorflow_framework shadow OpenSSL's and importing `_hashlib` crashes.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2

_TF_DIR = Path(importlib.util.find_spec("tensorflow").origin).parent
# Loaded in this order: libtensorflow_cc needs the framework's symbols already present.
_LIBRARIES = [ctypes.CDLL(str(_TF_DIR / name), mode=os.RTLD_LAZY | os.RTLD_LOCAL)
              for name in ("libtensorflow_framework.so.2", "libtensorflow_cc.so.2")]
TSTRING_BYTES = 24  # sizeof(TF_TString)


class Output(ctypes.Structure):
    _fields_ = [("oper", ctypes.c_void_p), ("index", ctypes.c_int)]


class Buffer(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("length", ctypes.c_size_t), ("data_deallocator", ctypes.c_void_p)]


def _function(name: str, restype, *argtypes):
    for library in _LIBRARIES:
        try:
            function = getattr(library, name)
        except AttributeError:
            continue
        function.restype, function.argtypes = restype, list(argtypes)
        return function
    raise RuntimeError(f"{name} is in neither TensorFlow library")


P = ctypes.c_void_p
_new_status = _function("TF_NewStatus", P)
_delete_status = _function("TF_DeleteStatus", None, P)
_get_code = _function("TF_GetCode", ctypes.c_int, P)
_message = _function("TF_Message", ctypes.c_char_p, P)
_new_buffer = _function("TF_NewBuffer", ctypes.POINTER(Buffer))
_new_buffer_from_string = _function("TF_NewBufferFromString", ctypes.POINTER(Buffer), ctypes.c_char_p, ctypes.c_size_t)
_delete_buffer = _function("TF_DeleteBuffer", None, ctypes.POINTER(Buffer))
_new_graph = _function("TF_NewGraph", P)
_delete_graph = _function("TF_DeleteGraph", None, P)
_new_session_options = _function("TF_NewSessionOptions", P)
_delete_session_options = _function("TF_DeleteSessionOptions", None, P)
_set_config = _function("TF_SetConfig", None, P, ctypes.c_char_p, ctypes.c_size_t, P)
_load_session = _function("TF_LoadSessionFromSavedModel", P, P, ctypes.POINTER(Buffer), ctypes.c_char_p,
                          ctypes.POINTER(ctypes.c_char_p), ctypes.c_int, P, ctypes.POINTER(Buffer), P)
_session_run = _function("TF_SessionRun", None, P, ctypes.POINTER(Buffer), ctypes.POINTER(Output), ctypes.POINTER(P),
                         ctypes.c_int, ctypes.POINTER(Output), ctypes.POINTER(P), ctypes.c_int, ctypes.POINTER(P),
                         ctypes.c_int, ctypes.POINTER(Buffer), P)
_close_session = _function("TF_CloseSession", None, P, P)
_delete_session = _function("TF_DeleteSession", None, P, P)
_operation_by_name = _function("TF_GraphOperationByName", P, P, ctypes.c_char_p)
_allocate_tensor = _function("TF_AllocateTensor", P, ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int,
                             ctypes.c_size_t)
_c_tensor_from_proto = _function("TF_TensorFromProto", None, ctypes.POINTER(Buffer), P, P)
_delete_tensor = _function("TF_DeleteTensor", None, P)
_tensor_type = _function("TF_TensorType", ctypes.c_int, P)
_num_dims = _function("TF_NumDims", ctypes.c_int, P)
_dim = _function("TF_Dim", ctypes.c_int64, P, ctypes.c_int)
_tensor_data = _function("TF_TensorData", P, P)
_element_count = _function("TF_TensorElementCount", ctypes.c_int64, P)
_string_data = _function("TF_StringGetDataPointer", P, P)
_string_size = _function("TF_StringGetSize", ctypes.c_size_t, P)

# Tensor::AsProtoField: which repeated field holds each dtype, and its ctypes element type.
_PROTO_FIELDS = {
    types_pb2.DT_FLOAT: ("float_val", ctypes.c_float), types_pb2.DT_DOUBLE: ("double_val", ctypes.c_double),
    types_pb2.DT_INT32: ("int_val", ctypes.c_int32), types_pb2.DT_INT64: ("int64_val", ctypes.c_int64),
    types_pb2.DT_BOOL: ("bool_val", ctypes.c_bool),
}


class TFError(Exception):
    """A TensorFlow status that is not OK; `code` is TF's code, numbered as gRPC's."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class _Status:
    def __init__(self) -> None:
        self.pointer = _new_status()

    def check(self) -> None:
        code = _get_code(self.pointer)
        if code:
            raise TFError(code, _message(self.pointer).decode(errors="replace"))

    def __enter__(self) -> "_Status":
        return self

    def __exit__(self, *_) -> None:
        _delete_status(self.pointer)


def _buffer(message) -> ctypes.POINTER(Buffer):
    data = message.SerializeToString()
    return _new_buffer_from_string(data, len(data))


def _tensor_from_proto(proto: tensor_pb2.TensorProto) -> int:
    """A new TF_Tensor holding `proto` (Tensor::FromProto replaces the placeholder it is given)."""
    tensor = _allocate_tensor(types_pb2.DT_FLOAT, None, 0, 4)
    buffer = _buffer(proto)
    try:
        with _Status() as status:
            _c_tensor_from_proto(buffer, tensor, status.pointer)
            status.check()
    except TFError:
        _delete_tensor(tensor)
        raise
    finally:
        _delete_buffer(buffer)
    return tensor


def _tensor_to_proto(tensor: int) -> tensor_pb2.TensorProto:
    """Tensor::AsProtoField: dtype, shape, and the values in the dtype's repeated field."""
    dtype = _tensor_type(tensor)
    shape = [_dim(tensor, n) for n in range(_num_dims(tensor))]
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=size) for size in shape]))
    count, data = _element_count(tensor), _tensor_data(tensor)
    if dtype == types_pb2.DT_STRING:
        proto.string_val.extend(ctypes.string_at(_string_data(data + n * TSTRING_BYTES),
                                                 _string_size(data + n * TSTRING_BYTES)) for n in range(count))
    elif dtype in _PROTO_FIELDS:
        field, element = _PROTO_FIELDS[dtype]
        getattr(proto, field).extend((element * count).from_address(data) if count else [])
    else:
        raise TFError(12, f"output dtype {types_pb2.DataType.Name(dtype)} is not supported by this stand-in")
    return proto


class SavedModelSession:
    """One SavedModel version loaded into a TF session by the C++ loader (tag "serve")."""

    def __init__(self, export_dir: Path, intra_op_threads: int = 0, inter_op_threads: int = 0):
        self.graph = _new_graph()
        options = _new_session_options()
        meta_graph = _new_buffer()
        try:
            with _Status() as status:
                config = config_pb2.ConfigProto(intra_op_parallelism_threads=intra_op_threads,
                                                inter_op_parallelism_threads=inter_op_threads)
                serialized = config.SerializeToString()
                _set_config(options, serialized, len(serialized), status.pointer)
                status.check()
                tags = (ctypes.c_char_p * 1)(b"serve")
                self.session = _load_session(options, None, str(export_dir).encode(), tags, 1, self.graph, meta_graph,
                                             status.pointer)
                status.check()
            self.meta_graph = meta_graph_pb2.MetaGraphDef.FromString(
                ctypes.string_at(meta_graph.contents.data, meta_graph.contents.length))
        except TFError:
            _delete_graph(self.graph)
            raise
        finally:
            _delete_buffer(meta_graph)
            _delete_session_options(options)

    def _output(self, tensor_name: str) -> Output:
        operation, _, index = tensor_name.partition(":")
        pointer = _operation_by_name(self.graph, operation.encode())
        if not pointer:
            raise TFError(5, f"tensor {tensor_name} is not in the graph")
        return Output(pointer, int(index or 0))

    def run(self, feeds: dict[str, tensor_pb2.TensorProto], fetches: list[str],
            timeout_ms: int | None = None) -> list[tensor_pb2.TensorProto]:
        """Session::Run on tensor names; a deadline becomes RunOptions.timeout_in_ms, as in TF Serving."""
        inputs = (Output * len(feeds))(*(self._output(name) for name in feeds))
        outputs = (Output * len(fetches))(*(self._output(name) for name in fetches))
        values = (P * len(feeds))()
        results = (P * len(fetches))()
        run_options = _buffer(config_pb2.RunOptions(timeout_in_ms=timeout_ms)) if timeout_ms else None
        try:
            for position, proto in enumerate(feeds.values()):
                values[position] = _tensor_from_proto(proto)
            with _Status() as status:
                _session_run(self.session, run_options, inputs, values, len(feeds), outputs, results, len(fetches),
                             None, 0, None, status.pointer)
                status.check()
            return [_tensor_to_proto(tensor) for tensor in results]
        finally:
            for tensor in (*values, *results):
                if tensor:
                    _delete_tensor(tensor)
            if run_options:
                _delete_buffer(run_options)

    def close(self) -> None:
        with _Status() as status:
            _close_session(self.session, status.pointer)
            _delete_session(self.session, status.pointer)
        _delete_graph(self.graph)
