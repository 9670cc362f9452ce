"""The TF Serving mode, against a double that speaks the real PredictionService protocol."""
import shutil
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2, prediction_service_pb2_grpc

from client import RecommenderClient
from server.app import create_server
from server.errors import BackendMisconfigured
from server.options import ServerOptions
from server.tf_serving import TFServingBackend
from tests.conftest import status_of
from tests.tf_serving_double import start_tf_serving_double

SAMPLE_USERS = ["1", "42", "99", "276", "405", "655", "943", "cold-start-user"]


@pytest.fixture(scope="module")
def tf_serving(models_dir):
    server, port, servicer = start_tf_serving_double(models_dir / "models.config")
    yield port, servicer
    server.stop(0)


def _serve(models_dir, backend, poll_seconds=0.2):
    recommender, port = create_server("127.0.0.1:0", backend, models_dir, ServerOptions(poll_seconds=poll_seconds))
    recommender.start()
    client = RecommenderClient(f"127.0.0.1:{port}", timeout=10)
    return recommender, client


@pytest.fixture(scope="module")
def via_tf_serving(models_dir, tf_serving):
    recommender, client = _serve(models_dir, TFServingBackend(f"127.0.0.1:{tf_serving[0]}"))
    client.wait_until_serving(60)
    yield client
    client.close()
    recommender.stop(0).wait()


def test_same_items_same_order_as_in_process(via_tf_serving, client):
    for user in SAMPLE_USERS:
        for options in ({"k": 20}, {"k": 10, "exclude": ["50", "100", "181"]}, {"k": 10, "include_rated": True}):
            remote = via_tf_serving.recommend(user, **options)
            local = client.recommend(user, **options)
            assert [item.item_id for item in remote] == [item.item_id for item in local], (user, options)
            for field in ("score", "retrieval_score", "predicted_rating"):
                np.testing.assert_allclose([getattr(i, field) for i in remote], [getattr(i, field) for i in local],
                                           atol=1e-5)
            assert [item.fallback for item in remote] == [item.fallback for item in local]


def test_model_version_is_what_tf_serving_ran(via_tf_serving):
    items = via_tf_serving.recommend("42", k=3)
    assert {item.model_version for item in items} == {"1"}
    info = via_tf_serving.model_info()
    assert info.backend == "tf-serving" and info.model_version == "1"


def test_one_predict_call_per_stage(via_tf_serving, tf_serving):
    _, servicer = tf_serving
    before = servicer.predict_calls
    via_tf_serving.recommend("42", k=50)
    assert servicer.predict_calls - before == 2


def test_warmup_records_run_against_tf_serving(models_dir, tf_serving):
    port, _ = tf_serving
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for model in ("retrieval", "ranking"):
            path = models_dir / model / "1" / "assets.extra" / "tf_serving_warmup_requests"
            records = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
            assert records
            for record in records:
                request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
                response = stub.Predict(request, timeout=10)
                assert response.model_spec.version.value == 1 and response.outputs


@pytest.mark.parametrize("backend_options, missing", [
    ({"model_version": 99}, "Specific(retrieval, 99)"),
    ({"ranking_model": "no-such-model"}, "no-such-model"),
])
def test_missing_model_or_version_is_reported_not_unknown(models_dir, tf_serving, backend_options, missing):
    recommender, client = _serve(models_dir, TFServingBackend(f"127.0.0.1:{tf_serving[0]}", **backend_options))
    try:
        time.sleep(0.5)
        assert client.health() == "NOT_SERVING"
        code, details = status_of(lambda: client.recommend("42"))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "TF Serving" in details and "NOT_FOUND" in details and missing in details
    finally:
        client.close()
        recommender.stop(0).wait()


def test_version_without_local_metadata_is_not_serving_until_it_appears(models_dir, tf_serving, tmp_path):
    recommender, client = _serve(tmp_path, TFServingBackend(f"127.0.0.1:{tf_serving[0]}"))
    try:
        time.sleep(0.5)
        assert client.health() == "NOT_SERVING"
        code, details = status_of(lambda: client.recommend("42"))
        assert code == grpc.StatusCode.UNAVAILABLE and "no metadata for model version 1" in details
        (tmp_path / "metadata").mkdir()
        shutil.copy(models_dir / "metadata" / "1.json", tmp_path / "metadata" / "1.json")
        client.wait_until_serving(10)
        assert len(client.recommend("42")) == 10
    finally:
        client.close()
        recommender.stop(0).wait()


def test_version_vanishing_between_stages_is_failed_precondition(models_dir, tf_serving):
    """Retrieval answered with a version whose ranking model TF Serving does not have."""
    backend = TFServingBackend(f"127.0.0.1:{tf_serving[0]}")
    assert backend.refresh()
    with pytest.raises(BackendMisconfigured, match="NOT_FOUND.*Specific\\(ranking, 7\\)"):
        backend.rank(["42"], ["1"], model_version="7", timeout=5)


def test_tf_serving_down_then_back(models_dir):
    server, port, _ = start_tf_serving_double(models_dir / "models.config")
    recommender, client = _serve(models_dir, TFServingBackend(f"127.0.0.1:{port}"))
    try:
        client.wait_until_serving(60)
        assert client.recommend("42")
        server.stop(0).wait()
        code, details = status_of(lambda: client.recommend("42"))
        assert code == grpc.StatusCode.UNAVAILABLE and "TF Serving" in details
        deadline = time.monotonic() + 10
        while client.health() != "NOT_SERVING":
            assert time.monotonic() < deadline, "health never went NOT_SERVING"
            time.sleep(0.1)
        server, again, _ = start_tf_serving_double(models_dir / "models.config", port=port)
        assert again == port
        client.wait_until_serving(30)
        assert len(client.recommend("42")) == 10
    finally:
        client.close()
        recommender.stop(0).wait()
        server.stop(0)
