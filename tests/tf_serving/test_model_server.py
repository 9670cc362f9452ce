"""The TF Serving stand-in behaves as tensorflow_model_server does, on the real exported SavedModels:
Predict's rules (predict_util.cc), metadata and status, the version lifecycle, and a crash that
takes the whole process down."""
import shutil

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from tests.conftest import start_tf_serving, status_of, stop_process, wait_for
from tests.tf_serving.c_api import SavedModelSession, TFError

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END


@pytest.fixture(scope="module")
def standin(models_dir):
    process, port = start_tf_serving(models_dir / "models.config")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield process, prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()
    stop_process(process)


def _request(model: str, signature: str = "", version: int | None = None, **inputs) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model, signature_name=signature))
    if version is not None:
        request.model_spec.version.value = version
    for key, value in inputs.items():
        value = np.asarray(value)
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value, dtype=tf.string if value.dtype == object else None))
    return request


def user_inputs(*user_ids: str, interactions: list[tuple[str, float]] = ()) -> dict[str, np.ndarray]:
    """The user side of every signature; the same interactions for each user."""
    count = len(user_ids)
    return {"user_id": np.array([user.encode() for user in user_ids], dtype=object),
            "interaction_item_ids": np.array([[item.encode() for item, _ in interactions]] * count,
                                             dtype=object).reshape(count, len(interactions)),
            "interaction_ratings": np.array([[stars for _, stars in interactions]] * count,
                                            dtype=np.float32).reshape(count, len(interactions))}


def ranking_inputs(*user_ids: str, item_ids=("1", "2"), interactions: list[tuple[str, float]] = ()):
    return {**user_inputs(*user_ids, interactions=interactions),
            "item_ids": np.array([[item.encode() for item in item_ids]] * len(user_ids), dtype=object)}


RECENT = [("1", 4.0), ("50", 0.0)]
SIGNATURE_INPUTS = {("retrieval", "serving_default"): user_inputs("42", interactions=RECENT),
                    ("retrieval", "include_rated"): user_inputs("42", interactions=RECENT),
                    ("retrieval", "similar_items"): {**user_inputs("42", interactions=RECENT),
                                                     "item_id": np.array([b"1"], dtype=object)},
                    ("ranking", "serving_default"): ranking_inputs("42", interactions=RECENT),
                    ("ranking", "explain"): ranking_inputs("42", interactions=RECENT)}


def test_the_port_opens_after_the_initial_load(standin):
    process, _ = standin
    log = "".join(process.log_lines)
    opened = log.index("Running gRPC ModelServer")
    for model in ("retrieval", "ranking"):
        assert log.index(f"Successfully loaded servable version {{name: {model} version: 1}}") < opened


def test_predict_answers_with_typed_proto_fields(standin):
    _, stub = standin
    response = stub.Predict(_request("retrieval", **user_inputs("42", "nobody", interactions=[("1", 4.0)])),
                            timeout=10)
    assert response.model_spec.version.value == 1 and response.model_spec.signature_name == "serving_default"
    item_ids, scores = response.outputs["item_ids"], response.outputs["scores"]
    assert item_ids.string_val and not item_ids.tensor_content and scores.float_val and not scores.tensor_content
    assert [dim.size for dim in scores.tensor_shape.dim] == [2, len(scores.float_val) // 2]


@pytest.mark.parametrize("model, signature, name", [(model, signature, name) for (model, signature), inputs
                                                     in SIGNATURE_INPUTS.items() for name in inputs])
@pytest.mark.parametrize("wrong", ["scalar", "one more dimension"])
def test_every_signature_rejects_a_wrong_rank_and_the_server_stays_up(standin, model, signature, name, wrong):
    process, stub = standin
    inputs = dict(SIGNATURE_INPUTS[(model, signature)])
    valid = inputs[name]
    inputs[name] = valid.ravel()[0] if wrong == "scalar" else valid[..., None]
    code, details = status_of(lambda: stub.Predict(_request(model, signature, **inputs), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "shape" in details.lower()
    assert process.poll() is None, "a malformed input must not take TF Serving down"
    assert stub.Predict(_request("retrieval", **user_inputs("42")), timeout=10).outputs


@pytest.mark.parametrize("model, signature", list(SIGNATURE_INPUTS))
@pytest.mark.parametrize("mismatch", ["ratings", "more interaction rows", "more user ids"])
def test_inputs_whose_shapes_disagree_are_invalid_argument(standin, model, signature, mismatch):
    process, stub = standin
    inputs = dict(SIGNATURE_INPUTS[(model, signature)])
    if mismatch == "ratings":  # one rating for two movies
        inputs["interaction_ratings"] = inputs["interaction_ratings"][:, :1]
    elif mismatch == "more interaction rows":  # interactions for three users, one user id
        inputs["interaction_item_ids"] = np.repeat(inputs["interaction_item_ids"], 3, axis=0)
        inputs["interaction_ratings"] = np.repeat(inputs["interaction_ratings"], 3, axis=0)
    else:
        inputs["user_id"] = np.repeat(inputs["user_id"], 3)
    code, _ = status_of(lambda: stub.Predict(_request(model, signature, **inputs), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert process.poll() is None


def test_a_wrong_dtype_is_invalid_argument(standin):
    _, stub = standin
    inputs = {**user_inputs("42"), "user_id": np.array([1.5], np.float32)}
    code, details = status_of(lambda: stub.Predict(_request("retrieval", **inputs), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "string" in details


@pytest.mark.parametrize("change, code, message", [
    (lambda r: setattr(r.model_spec, "signature_name", "nope"), grpc.StatusCode.FAILED_PRECONDITION,
     'Serving signature key "nope" not found.'),
    (lambda r: r.inputs["extra"].CopyFrom(tf.make_tensor_proto([b"1"])), grpc.StatusCode.INVALID_ARGUMENT,
     "Sent extra: {extra}"),
    (lambda r: r.inputs.pop("user_id"), grpc.StatusCode.INVALID_ARGUMENT, "Missing but required: {user_id}"),
    (lambda r: r.output_filter.append("nope"), grpc.StatusCode.INVALID_ARGUMENT,
     "output tensor alias not found in signature: nope"),
    (lambda r: setattr(r.model_spec, "version_label", "stable"), grpc.StatusCode.INVALID_ARGUMENT,
     "Unrecognized servable version label: stable"),
    (lambda r: r.model_spec.version.__setattr__("value", 9), grpc.StatusCode.NOT_FOUND,
     "Servable not found for request: Specific(retrieval, 9)"),
    (lambda r: setattr(r.model_spec, "name", "nope"), grpc.StatusCode.NOT_FOUND,
     "Servable not found for request: Latest(nope)"),
])
def test_predict_follows_predict_util(standin, change, code, message):
    _, stub = standin
    request = _request("retrieval", **user_inputs("42"))
    change(request)
    got_code, details = status_of(lambda: stub.Predict(request, timeout=10))
    assert got_code == code and message in details


def test_model_metadata(standin):
    _, stub = standin
    request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=model_pb2.ModelSpec(name="ranking"),
                                                             metadata_field=["signature_def"])
    response = stub.GetModelMetadata(request, timeout=10)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    assert response.model_spec.version.value == 1 and "serving_default" in signatures.signature_def
    request.metadata_field[:] = ["graph"]
    assert status_of(lambda: stub.GetModelMetadata(request, timeout=10))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_the_deadline_is_enforced_inside_session_run(models_dir):
    """RunOptions.timeout_in_ms, as TF Serving sets it from the call's deadline."""
    session = SavedModelSession(models_dir / "retrieval" / "1")
    signature = session.meta_graph.signature_def["serving_default"]
    inputs = user_inputs(*(str(n) for n in range(200_000)))
    feeds = {signature.inputs[key].name: tf.make_tensor_proto(value, dtype=tf.string if value.dtype == object else None)
             for key, value in inputs.items()}
    with pytest.raises(TFError) as error:
        session.run(feeds, [signature.outputs["scores"].name], timeout_ms=1)
    assert error.value.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    session.close()


def _copy_version(models_dir, target, version, models=("retrieval", "ranking")):
    for model in models:
        shutil.copytree(models_dir / model / "1", target / model / str(version))


def _config(target, num_versions=2):
    config = model_server_config_pb2.ModelServerConfig()
    for name in ("retrieval", "ranking"):
        entry = config.model_config_list.config.add(name=name, base_path=str(target / name),
                                                   model_platform="tensorflow")
        entry.model_version_policy.latest.num_versions = num_versions
    path = target / "models.config"
    path.write_text(text_format.MessageToString(config))
    return path


def _statuses(port, model):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name=model)), timeout=10)
    return {status.version: status for status in response.model_version_status}


@pytest.mark.slow
def test_only_the_latest_versions_are_served_and_a_failed_warmup_fails_the_version(models_dir, tmp_path):
    for version in (1, 2, 3):
        _copy_version(models_dir, tmp_path, version)
    broken = tmp_path / "ranking" / "3" / "assets.extra" / "tf_serving_warmup_requests"
    with tf.io.TFRecordWriter(str(broken)) as writer:  # a request the signature refuses
        request = _request("ranking", **user_inputs("42"))
        writer.write(prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)).SerializeToString())
    process, port = start_tf_serving(_config(tmp_path))
    try:
        assert {v: s.state for v, s in _statuses(port, "retrieval").items()} == {2: AVAILABLE, 3: AVAILABLE}
        ranking = _statuses(port, "ranking")
        assert ranking[2].state == AVAILABLE and ranking[3].state == END
        assert ranking[3].status.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "Missing but required: {item_ids}" in ranking[3].status.error_message
        _copy_version(models_dir, tmp_path, 4, models=("retrieval",))
        wait_for(lambda: set(_statuses(port, "retrieval")) == {3, 4}, what="version 2 unloaded once 4 is AVAILABLE")
    finally:
        stop_process(process)


@pytest.mark.slow
def test_a_check_failure_inside_tensorflow_kills_the_whole_server(tmp_path):
    """What TF Serving does on a CHECK-abort: the process dies, for every model and every client.
    The export's own pieces without its shape check (a string lookup, then a ragged gather of
    the rows) show it: a scalar id aborts inside RaggedGather (tensorflow/tensorflow#85242)."""
    from recsys.export.models import RaggedTable

    module = tf.Module()
    module.lookup = tf.keras.layers.StringLookup(vocabulary=["a", "b"], mask_token=None)
    module.rated = RaggedTable([[0], [1, 2]], np.int32, name="rated")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="user_id")])
    def rated_count(user_id):
        return {"count": module.rated.rows(module.lookup(user_id), validate=False).row_lengths()}

    export = tmp_path / "unchecked" / "1"
    tf.saved_model.save(module, str(export), signatures={"serving_default": rated_count})
    config = model_server_config_pb2.ModelServerConfig()
    config.model_config_list.config.add(name="unchecked", base_path=str(export.parent), model_platform="tensorflow")
    (tmp_path / "models.config").write_text(text_format.MessageToString(config))
    process, port = start_tf_serving(tmp_path / "models.config")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            answer = stub.Predict(_request("unchecked", user_id=np.array([b"b", b"nobody"])), timeout=10)
            assert list(answer.outputs["count"].int64_val) == [2, 0]
            code, _ = status_of(lambda: stub.Predict(_request("unchecked", user_id=np.array(b"b")), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE, "the connection died with the process"
        assert process.wait(timeout=10) < 0, "killed by a signal (SIGABRT), as tensorflow_model_server is"
    finally:
        stop_process(process)
