"""The TF Serving mode, against the stand-in (tests/tf_serving: TensorFlow's C++ loader, TF Serving's
lifecycle and Predict rules), including the rollouts a real TF Serving goes through."""
import json
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import prediction_log_pb2, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from recsys.client import RecommenderClient
from recsys.server.app import create_server
from recsys.server.backend import Deadline, UserBatch
from recsys.server.catalog import CatalogStore
from recsys.server.errors import ModelsUnavailable
from recsys.server.options import ServerOptions
from recsys.server.tf_serving import TFServingBackend
from tests.conftest import start_tf_serving, status_of, stop_process, wait_for

SAMPLE_USERS = ["1", "42", "99", "276", "405", "655", "943", "cold-start-user"]


@pytest.fixture(scope="module")
def tf_serving(models_dir):
    process, port = start_tf_serving(models_dir / "models.config")
    yield port
    stop_process(process)


def _serve(models_dir, backend, poll_seconds=0.2):
    recommender, port = create_server("127.0.0.1:0", backend, models_dir, ServerOptions(poll_seconds=poll_seconds))
    recommender.start()
    client = RecommenderClient(f"127.0.0.1:{port}", timeout=10)
    return recommender, client


@pytest.fixture(scope="module")
def served(models_dir, tf_serving):
    backend = TFServingBackend(f"127.0.0.1:{tf_serving}", models_dir)
    recommender, client = _serve(models_dir, backend)
    client.wait_until_serving(60)
    yield client, backend
    client.close()
    recommender.stop(0).wait()


def test_same_items_same_order_as_in_process(served, client, models_dir):
    via_tf_serving, _ = served
    # All but the 15 least popular movies excluded: lists the popularity fill completes without the history.
    all_but_15 = list(CatalogStore(models_dir).get("1").popular_item_ids[:-15])
    for user in SAMPLE_USERS:
        for options in ({"k": 20}, {"k": 10, "exclude": ["50", "100", "181"]}, {"k": 10, "include_rated": True},
                        {"k": 20, "exclude": all_but_15},
                        {"k": 20, "interactions": [("50", 5.0), ("181", 0.0), ("2", 1.0), ("no-such-movie", 3.0)]},
                        {"k": 10, "include_rated": True, "interactions": [("1", 4.5)]}):
            remote = via_tf_serving.recommend(user, **options)
            local = client.recommend(user, **options)
            assert [item.item_id for item in remote] == [item.item_id for item in local], (user, options)
            for field in ("score", "retrieval_score", "predicted_rating"):
                np.testing.assert_allclose([getattr(i, field) for i in remote], [getattr(i, field) for i in local],
                                           atol=1e-5)
            assert [item.fallback for item in remote] == [item.fallback for item in local]


def test_similar_items_and_reasons_are_the_same_as_in_process(served, client):
    via_tf_serving, _ = served
    for user in ("", "42", "cold-start-user"):
        remote, local = via_tf_serving.similar("1", k=10, user_id=user), client.similar("1", k=10, user_id=user)
        assert [item.item_id for item in remote] == [item.item_id for item in local], user
        np.testing.assert_allclose([i.score for i in remote], [i.score for i in local], atol=1e-5)
    for user, interactions in (("42", []), ("42", [("2", 5.0)]), ("cold-start-user", [("1", 5.0), ("50", 3.0)])):
        remote = via_tf_serving.recommend(user, k=10, interactions=interactions)
        local = client.recommend(user, k=10, interactions=interactions)
        assert [list(item.because_item_ids) for item in remote] == [list(item.because_item_ids) for item in local]
        assert all(item.because_item_ids for item in remote)
    code, _ = status_of(lambda: via_tf_serving.similar("no-such-movie"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_model_version_is_what_tf_serving_ran(served):
    via_tf_serving, _ = served
    assert {item.model_version for item in via_tf_serving.recommend("42", k=3)} == {"1"}
    info = via_tf_serving.model_info()
    assert info.backend == "tf-serving" and info.model_version == "1"


def test_one_predict_call_per_stage_each_pinned_to_the_served_version(served, monkeypatch):
    via_tf_serving, backend = served
    sent = []
    predict = backend.stub.Predict

    def counting(request, **kwargs):
        sent.append((request.model_spec.name, request.model_spec.signature_name, request.model_spec.version.value))
        return predict(request, **kwargs)

    monkeypatch.setattr(backend.stub, "Predict", counting)
    via_tf_serving.recommend("42", k=20)
    stages = [("retrieval", "serving_default", 1), ("ranking", "serving_default", 1), ("ranking", "explain", 1)]
    assert sent == stages
    sent.clear()
    assert len(via_tf_serving.recommend("42", k=50)) == 50, "more than the 40 candidates: the fill completes it"
    assert sent == stages + [("retrieval", "rated_items", 1)], "the history the fill leaves out, asked only then"


def test_warmup_records_run_against_tf_serving(models_dir, tf_serving):
    with grpc.insecure_channel(f"127.0.0.1:{tf_serving}") as channel:
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
    ({"model_version": 99}, "pinned version 99 is not AVAILABLE"),
    ({"ranking_model": "no-such-model"}, "does not have model 'no-such-model'"),
    ({"ranking_signature": "no-such-signature"}, "has no signature no-such-signature"),
])
def test_a_missing_model_version_or_signature_is_not_serving(models_dir, tf_serving, backend_options, missing):
    recommender, client = _serve(models_dir, TFServingBackend(f"127.0.0.1:{tf_serving}", models_dir, **backend_options))
    try:
        time.sleep(0.5)
        assert client.health() == "NOT_SERVING"
        code, details = status_of(lambda: client.recommend("42"))
        assert code == grpc.StatusCode.UNAVAILABLE and missing in details
        assert "Could not find" not in details, "TF Serving's own error details stay in the log"
    finally:
        client.close()
        recommender.stop(0).wait()


def test_a_version_without_local_metadata_is_not_served_until_it_appears(models_dir, tf_serving, tmp_path):
    recommender, client = _serve(tmp_path, TFServingBackend(f"127.0.0.1:{tf_serving}", tmp_path))
    try:
        time.sleep(0.5)
        assert client.health() == "NOT_SERVING"
        code, details = status_of(lambda: client.recommend("42"))
        assert code == grpc.StatusCode.UNAVAILABLE and "with usable metadata" in details
        (tmp_path / "metadata").mkdir()
        shutil.copy(models_dir / "metadata" / "1.json", tmp_path / "metadata" / "1.json")
        client.wait_until_serving(10)
        assert len(client.recommend("42")) == 10
    finally:
        client.close()
        recommender.stop(0).wait()


def test_a_version_gone_between_stages_is_unavailable_not_a_precondition(models_dir, tf_serving):
    """Retrieval answered with a version TF Serving no longer has for ranking: retryable."""
    backend = TFServingBackend(f"127.0.0.1:{tf_serving}", models_dir)
    assert backend.refresh(CatalogStore(models_dir).get)
    with pytest.raises(ModelsUnavailable, match=r"does not have model 'ranking' version 7 now; retry$"):
        backend.rank(UserBatch.of(["42"]), np.array([["1"]], dtype=object), model_version="7", deadline=Deadline(5))


@pytest.mark.slow
def test_tf_serving_down_then_back(models_dir):
    process, port = start_tf_serving(models_dir / "models.config")
    recommender, client = _serve(models_dir, TFServingBackend(f"127.0.0.1:{port}", models_dir))
    try:
        client.wait_until_serving(60)
        assert client.recommend("42")
        stop_process(process)
        code, details = status_of(lambda: client.recommend("42"))
        assert code == grpc.StatusCode.UNAVAILABLE and "TF Serving" in details
        wait_for(lambda: client.health() == "NOT_SERVING", 10, "health NOT_SERVING")
        process, again = start_tf_serving(models_dir / "models.config", port=port)
        assert again == port
        client.wait_until_serving(30)
        assert len(client.recommend("42")) == 10
    finally:
        client.close()
        recommender.stop(0).wait()
        stop_process(process)


class Traffic:
    """Calls from two threads until stopped; every failure is kept, and the versions in order."""

    def __init__(self, client: RecommenderClient):
        self.client, self.failures, self.versions = client, [], []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(user,), daemon=True) for user in ("42", "1")]
        for thread in self._threads:
            thread.start()

    def _run(self, user: str) -> None:
        while not self._stop.is_set():
            try:
                items = self.client.recommend(user, timeout=10)
                self.versions.append({item.model_version for item in items})
            except grpc.RpcError as error:
                self.failures.append((error.code(), error.details()))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


@pytest.fixture()
def rollout(models_dir, tmp_path):
    """A models directory of our own with version 1, TF Serving on it (latest 2 kept), our server
    in front; `add(version, model)` copies a model's version 1 in as `version`."""
    for name in ("retrieval", "ranking"):
        shutil.copytree(models_dir / name / "1", tmp_path / name / "1")
    (tmp_path / "metadata").mkdir()
    metadata = json.loads((models_dir / "metadata" / "1.json").read_text())

    def add(version: int, model: str) -> None:
        metadata_file = tmp_path / "metadata" / f"{version}.json"
        if not metadata_file.exists():
            metadata_file.write_text(json.dumps({**metadata, "model_version": version}))
        staging = tmp_path / model / f".{version}"
        shutil.copytree(models_dir / model / "1", staging)
        staging.rename(tmp_path / model / str(version))

    (tmp_path / "metadata" / "1.json").write_text(json.dumps(metadata))
    config = model_server_config_pb2.ModelServerConfig()
    for name in ("retrieval", "ranking"):
        entry = config.model_config_list.config.add(name=name, base_path=str(tmp_path / name),
                                                   model_platform="tensorflow")
        entry.model_version_policy.latest.num_versions = 2
    (tmp_path / "models.config").write_text(text_format.MessageToString(config))
    process, port = start_tf_serving(tmp_path / "models.config")
    backend = TFServingBackend(f"127.0.0.1:{port}", tmp_path)
    recommender, client = _serve(tmp_path, backend, poll_seconds=0.2)
    client.wait_until_serving(60)
    yield add, client, backend, tmp_path, port
    client.close()
    recommender.stop(0).wait()
    stop_process(process)


@pytest.mark.slow
@pytest.mark.parametrize("first, second", [("retrieval", "ranking"), ("ranking", "retrieval")])
def test_a_rollout_with_one_model_ahead_fails_no_call(rollout, first, second):
    add, client, backend, _, _ = rollout
    traffic = Traffic(client)
    try:
        add(2, first)
        time.sleep(3)  # only one half of version 2 is AVAILABLE: version 1 serves on
        assert client.health() == "SERVING" and backend.current_version() == "1"
        add(2, second)
        wait_for(lambda: backend.current_version() == "2", 30, "the switch to version 2")
        wait_for(lambda: {"2"} in traffic.versions[-5:], 30, "traffic on version 2")
    finally:
        traffic.stop()
    assert traffic.failures == []
    switched = traffic.versions.index({"2"})
    assert all(versions == {"1"} for versions in traffic.versions[:switched])
    assert all(versions == {"2"} for versions in traffic.versions[switched:]), "never back, never mixed"


@pytest.mark.slow
def test_a_version_that_fails_its_warmup_never_serves(rollout, models_dir):
    add, client, backend, directory, _ = rollout
    traffic = Traffic(client)
    try:
        add(2, "retrieval")
        staging = directory / "ranking" / ".2"
        shutil.copytree(models_dir / "ranking" / "1", staging)
        request = prediction_log_pb2.PredictionLog()
        request.predict_log.request.model_spec.name = "ranking"
        request.predict_log.request.inputs["user_id"].CopyFrom(tf.make_tensor_proto([b"42"]))
        with tf.io.TFRecordWriter(str(staging / "assets.extra" / "tf_serving_warmup_requests")) as writer:
            writer.write(request.SerializeToString())  # inputs missing: the warmup request fails
        staging.rename(directory / "ranking" / "2")
        time.sleep(3)
    finally:
        traffic.stop()
    assert traffic.failures == [] and client.health() == "SERVING"
    assert backend.current_version() == "1" and {"2"} not in traffic.versions


@pytest.mark.slow
def test_a_pinned_version_outside_the_kept_window_is_not_serving(rollout):
    add, _, _, directory, port = rollout
    for version in (2, 3):
        add(version, "retrieval")
        add(version, "ranking")
    pinned = TFServingBackend(f"127.0.0.1:{port}", directory, model_version=1)
    catalogs = CatalogStore(directory)
    # Each model unloads version 1 and loads version 3 on its own schedule: wait for both.
    wait_for(lambda: not pinned.refresh(catalogs.get) and pinned.not_ready_reason().count("[2, 3]") == 2,
             30, "version 1 to leave TF Serving in both models")
    assert "pinned version 1 is not AVAILABLE" in pinned.not_ready_reason()
    assert TFServingBackend(f"127.0.0.1:{port}", directory, model_version=2).refresh(catalogs.get)
