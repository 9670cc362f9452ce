"""The gRPC service over a real loopback channel, with the generated client and real models."""
import re
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from recsys.client import RecommenderClient
from recsys.export.evaluate import two_stage_lists
from recsys.server.app import create_server
from recsys.server.catalog import CatalogStore
from recsys.server.in_process import InProcessBackend
from recsys.server.options import ServerOptions
from recsys.server.pipeline import Pipeline
from tests.conftest import status_of


def test_stream_is_ranked_best_first_and_honours_k(client):
    items = list(client.stream("42", k=7))
    assert [item.rank for item in items] == list(range(1, 8))
    assert all(not item.fallback for item in items)
    scores = [item.score for item in items]
    assert scores == sorted(scores, reverse=True)
    assert all(item.title and item.genres and item.model_version == "1" for item in items)
    assert len({item.item_id for item in items}) == 7
    assert len(client.recommend("42", k=0)) == 10, "k=0 means the default of 10"


def test_rated_and_excluded_movies_are_never_returned(client, heaviest_user, split):
    rated = {str(item) for user, item in split[0][:, :2] if str(user) == heaviest_user}
    first = client.recommend(heaviest_user, k=100)
    assert len(first) == 100 and not {item.item_id for item in first} & rated
    excluded = [item.item_id for item in first[:30]] + ["not-a-movie", first[0].item_id]
    second = client.recommend(heaviest_user, k=100, exclude=excluded)
    returned = {item.item_id for item in second}
    assert len(second) == 100
    assert not returned & set(excluded) and not returned & rated
    with_rated = client.recommend(heaviest_user, k=100, include_rated=True)
    assert {item.item_id for item in with_rated} & rated, "include_rated lets rated movies through"


def test_a_known_users_popular_fill_leaves_their_training_history_out(client, models_dir, heaviest_user, split):
    """The metadata holds no interactions: the fill asks the retrieval model (`rated_items`)."""
    rated = {str(item) for user, item in split[0][:, :2] if str(user) == heaviest_user}
    catalog = CatalogStore(models_dir).get("1")
    allowed = [item for item in catalog.popular_item_ids if item not in rated][-5:]
    excluded = [item for item in catalog.popular_item_ids if item not in rated and item not in allowed]
    items = client.recommend(heaviest_user, k=10, exclude=excluded)
    assert sorted(item.item_id for item in items) == sorted(allowed), "five movies left; none of the history"
    with_rated = client.recommend(heaviest_user, k=10, exclude=excluded, include_rated=True)
    assert len(with_rated) == 10 and {item.item_id for item in with_rated} & rated


def test_unknown_user_gets_popular_fallback(client, models_dir):
    popular = CatalogStore(models_dir).get("1").popular_item_ids
    items = client.recommend("a-user-nobody-knows", k=5, exclude=[popular[1]])
    assert all(item.fallback for item in items)
    assert [item.item_id for item in items] == [popular[0]] + list(popular[2:6])
    assert [item.rank for item in items] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("call, message", [
    (lambda c: c.recommend(""), "user_id must not be empty"),
    (lambda c: c.recommend("42", k=101), "k=101 exceeds the maximum of 100"),
    (lambda c: c.recommend("42", exclude=[str(i) for i in range(10_001)]), "exclude_item_ids has 10001 ids"),
    (lambda c: c.recommend("x" * 129), "user_id is 129 characters"),
    (lambda c: c.recommend_batch([str(i) for i in range(101)]), "requests has 101 entries"),
    (lambda c: c.recommend_batch(["42", ""]), r"requests\[1\]: user_id must not be empty"),
])
def test_bad_input_gets_invalid_argument(client, call, message):
    code, details = status_of(lambda: call(client))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, details), details


def test_health_is_serving_for_both_names(running_server, client):
    assert client.health("") == "SERVING"
    assert client.health("recsys.v1.Recommender") == "SERVING"


def test_reflection_lists_the_service(running_server):
    _, port = running_server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "recsys.v1.Recommender" in services and "grpc.health.v1.Health" in services


def test_too_short_deadline_then_server_keeps_serving(client):
    code, _ = status_of(lambda: client.recommend("42", k=100, timeout=0.0001))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(client.recommend("42")) == 10


def test_served_top_k_equals_the_offline_two_stage_list(client, models_dir, served_backend):
    users = [str(u) for u in (1, 13, 42, 99, 276, 405, 655, 943)]
    offline = two_stage_lists(Pipeline(served_backend, CatalogStore(models_dir)), users)
    for user in users:
        assert [item.item_id for item in client.recommend(user, k=10)] == offline[user][:10]
        assert [item.item_id for item in client.recommend(user, k=100)] == offline[user]


def test_batch_equals_single_calls(client):
    results = client.recommend_batch(["42", "7", "nobody"], k=5)
    assert [result.user_id for result in results] == ["42", "7", "nobody"]
    for result in results:
        single = client.recommend(result.user_id, k=5)
        assert [item.item_id for item in result.items] == [item.item_id for item in single]
        # Batched matrix products may differ from single ones in the last float bit.
        assert [item.score for item in result.items] == pytest.approx([item.score for item in single], abs=1e-5)
        assert [item.fallback for item in result.items] == [item.fallback for item in single]


def test_model_info(client, trained):
    info = client.model_info()
    assert info.model_version == "1" and info.backend == "in-process"
    assert info.candidate_count == trained[1].retrieval.candidate_count and info.max_k == 100 and info.default_k == 10
    assert info.max_exclude_item_ids == 10_000 and info.preset == "tiny"


class ExplodingBackend(InProcessBackend):
    """Fails the way a bug would, to prove the wire sees INTERNAL and nothing more."""

    def retrieve_and_rank(self, *args, **kwargs):
        raise RuntimeError("secret stack detail")


def test_unexpected_errors_become_internal_without_details(models_dir):
    recommender, port = create_server("127.0.0.1:0", ExplodingBackend(models_dir), models_dir, ServerOptions(poll_seconds=0.5))
    recommender.start()
    try:
        with RecommenderClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(60)
            code, details = status_of(lambda: client.recommend("42"))
            assert code == grpc.StatusCode.INTERNAL
            assert "secret" not in details and "RuntimeError" not in details
            assert client.recommend("nobody")[0].fallback, "a cold-start call needs no model and still works"
    finally:
        recommender.stop(0).wait()


def test_not_ready_until_models_load_but_live(tmp_path):
    """Readiness (the service's name) follows the models; liveness ("") only says the process answers,
    so a slow start or a backend outage never gets a healthy pod restarted."""
    recommender, port = create_server("127.0.0.1:0", InProcessBackend(tmp_path), tmp_path,
                                      ServerOptions(poll_seconds=0.2))
    recommender.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service, status in (("recsys.v1.Recommender", "NOT_SERVING"), ("", "SERVING")):
                response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert health_pb2.HealthCheckResponse.ServingStatus.Name(response.status) == status
        with RecommenderClient(f"127.0.0.1:{port}") as client:
            code, details = status_of(lambda: client.recommend("42"))
            assert code == grpc.StatusCode.UNAVAILABLE and "no model version has loaded yet" in details
            assert str(tmp_path) not in details, "paths stay in the server's log"
    finally:
        recommender.stop(0).wait()


def test_with_nothing_to_serve_the_log_says_what_the_directory_lacks(tmp_path, caplog, monkeypatch):
    import recsys.server.in_process

    monkeypatch.setattr(recsys.server.in_process, "NOTHING_TO_SERVE_WARNING_SECONDS", 0.3)
    missing = tmp_path / "no-such-export"
    backend = InProcessBackend(missing)
    with caplog.at_level("WARNING", logger="recsys.server"):
        for _ in range(3):
            assert not backend.refresh(lambda version: None)
        time.sleep(0.35)
        assert not backend.refresh(lambda version: None)
    warnings = [record.getMessage() for record in caplog.records if "nothing to serve" in record.getMessage()]
    assert len(warnings) == 2, "repeated, but rate-limited"
    assert str(missing) in warnings[0] and "does not exist" in warnings[0] and "metadata/<v>.json" in warnings[0]
