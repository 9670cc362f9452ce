"""Recent interactions in the request, on the wire: real server, generated client, real SavedModels."""
import dataclasses
import json
import logging
import math
import re

import grpc
import pytest

from recsys.client.__main__ import main as client_main
from recsys.export.evaluate import interactions_by_user, two_stage_lists
from recsys.server.catalog import CatalogStore
from recsys.server.errors import InvalidRequest
from recsys.server.pipeline import Pipeline
from recsys.server.validation import Interaction, Query, check_interactions
from recsys.v1 import recommender_pb2
from tests.conftest import status_of

NEW_USER = "someone-new"


@pytest.fixture(scope="module")
def popular(models_dir):
    return CatalogStore(models_dir).get("1").popular_item_ids


def _ids(items) -> list[str]:
    return [item.item_id for item in items]


def test_a_known_users_interactions_change_their_list_at_once(client, popular):
    before = client.recommend("42", k=20)
    sent = [(item.item_id, 5.0) for item in before[:3]] + [(popular[-1], 1.0)]
    after = client.recommend("42", k=20, interactions=sent)
    assert _ids(after) != _ids(before)
    assert not {item for item, _ in sent} & set(_ids(after)), "movies just rated are never returned"
    assert all(not item.fallback for item in after)
    everything = client.recommend("42", k=100, include_rated=True, interactions=sent)
    assert {item for item, _ in sent} & set(_ids(everything)), "include_rated lets them through"


def test_an_unknown_user_with_interactions_is_personalised_not_the_fallback(client, popular, split):
    cold = client.recommend(NEW_USER, k=10)
    assert all(item.fallback for item in cold) and _ids(cold) == list(popular[:10])
    sent = [(str(item), float(stars)) for _, item, stars, _ in split[0][split[0][:, 0] == 7][:8].tolist()]
    served = client.recommend(NEW_USER, k=10, interactions=sent)
    assert all(not item.fallback for item in served) and len(served) == 10
    assert _ids(served) != list(popular[:10])
    assert not {item for item, _ in sent} & set(_ids(served))
    other = client.recommend(NEW_USER, k=10, interactions=[(item, 5.0) for item in popular[-8:]])
    assert _ids(other) != _ids(served), "different interactions, a different list"


def test_only_unknown_movies_means_the_fallback_and_they_are_counted(client, caplog, popular):
    caplog.set_level(logging.INFO, logger="recsys.requests")
    items = client.recommend(NEW_USER, k=5, interactions=[("no-such-movie", 4.0), ("nor-this", 0.0)])
    assert all(item.fallback for item in items) and _ids(items) == list(popular[:5])
    known = client.recommend("42", k=5, interactions=[("no-such-movie", 4.0), (popular[0], 5.0)])
    assert all(not item.fallback for item in known)
    assert (items.unknown_interactions, known.unknown_interactions) == (2, 1)
    lines = [json.loads(record.getMessage()) for record in caplog.records if record.name == "recsys.requests"]
    assert [(line["interactions"], line["unknown_interactions"]) for line in lines[-2:]] == [(2, 2), (2, 1)]


def test_the_served_list_is_the_offline_pipelines_with_the_same_interactions(client, models_dir, split,
                                                                              served_backend, movielens):
    rows = split[1][split[1][:, 0] <= 30]
    sent = interactions_by_user(rows, movielens.names)
    users = sorted(sent, key=int)[:8] + [NEW_USER]
    sent[NEW_USER] = sent[users[0]]
    offline = two_stage_lists(Pipeline(served_backend, CatalogStore(models_dir)), users, k=20, sent=sent)
    for user in users:
        assert _ids(client.recommend(user, k=20, interactions=sent[user])) == offline[user]


def test_interactions_naming_unknown_movies_are_counted_for_the_caller(fake_server, capsys):
    client, _ = fake_server
    client.wait_until_serving(10)
    items = client.recommend("new", k=5, interactions=[("no-such-movie", 4.0), ("m3", 5.0)])
    assert items.unknown_interactions == 1 and len(items) == 5
    assert client.recommend("new", k=5, interactions=[("m3", 5.0)]).unknown_interactions == 0
    (result,) = client.recommend_batch(["new"], k=5, interactions={"new": [("x", 1.0), ("y", 0.0), ("m3", 5.0)]})
    assert result.unknown_interactions == 2
    assert client_main(["recommend", "--target", client.target, "--user", "new", "--interaction", "nope:4"]) == 0
    assert "1 of the interactions used name movies the served models do not know" in capsys.readouterr().err


def test_similar_items_names_the_queried_movie(fake_server, capsys):
    client, _ = fake_server
    client.wait_until_serving(10)
    assert client.similar("m10", k=3).item_title == "Movie m10"
    assert client_main(["similar", "--target", client.target, "--item", "m10", "-k", "3"]) == 0
    assert capsys.readouterr().out.startswith("like Movie m10, model version 1\n")


def test_a_batch_carries_interactions_per_request(client, popular):
    sent = {"42": [(popular[0], 5.0), (popular[3], 2.0)], NEW_USER: [(popular[1], 4.0)]}
    results = client.recommend_batch(["42", "7", NEW_USER], k=5, interactions=sent)
    for result in results:
        single = client.recommend(result.user_id, k=5, interactions=sent.get(result.user_id, ()))
        assert _ids(result.items) == _ids(single)
        assert [item.fallback for item in result.items] == [item.fallback for item in single]
    assert not any(item.fallback for item in results[2].items)


def _request(**fields) -> recommender_pb2.RecommendRequest:
    return recommender_pb2.RecommendRequest(user_id="42", **fields)


def _interaction(item_id="50", rating=4.0, timestamp_seconds=0) -> recommender_pb2.Interaction:
    return recommender_pb2.Interaction(item_id=item_id, rating=rating, timestamp_seconds=timestamp_seconds)


@pytest.mark.parametrize("request_, message", [
    (_request(recent_interactions=[_interaction(rating=7.0)]),
     r"recent_interactions\[0\]\.rating is 7\.0; it must be 0 \(no rating\) or 0\.5 to 5"),
    (_request(recent_interactions=[_interaction(), _interaction(rating=0.25)]), r"recent_interactions\[1\]\.rating"),
    (_request(recent_interactions=[_interaction(rating=-1.0)]), r"recent_interactions\[0\]\.rating"),
    (_request(recent_interactions=[_interaction(rating=math.nan)]), r"recent_interactions\[0\]\.rating is nan"),
    (_request(recent_interactions=[_interaction(rating=math.inf)]), r"recent_interactions\[0\]\.rating is inf"),
    (_request(recent_interactions=[_interaction(item_id="")]), r"recent_interactions\[0\]\.item_id must not be empty"),
    (_request(recent_interactions=[_interaction(item_id="x" * 129)]),
     r"recent_interactions\[0\]\.item_id is 129 characters; the maximum is 128"),
    (_request(recent_interactions=[_interaction(timestamp_seconds=-5)]),
     r"recent_interactions\[0\]\.timestamp_seconds is -5"),
    (_request(recent_interactions=[_interaction(item_id=str(n)) for n in range(1001)]),
     r"recent_interactions has 1001 entries; the maximum is 1000"),
])
def test_bad_interactions_get_invalid_argument_naming_the_field(client, request_, message):
    code, details = status_of(lambda: list(client.stub.Recommend(request_, timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, details), details


def test_a_batch_is_limited_in_interactions_overall(client):
    many = [_interaction(item_id=str(n)) for n in range(1000)]
    request = recommender_pb2.RecommendBatchRequest(requests=[_request(recent_interactions=many)] * 11)
    code, details = status_of(lambda: client.stub.RecommendBatch(request, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "hold 11000 entries in all" in details
    ok = recommender_pb2.RecommendBatchRequest(requests=[_request(recent_interactions=many)] * 10)
    assert len(client.stub.RecommendBatch(ok, timeout=30).results) == 10


def test_the_limit_is_in_model_info(client):
    assert client.model_info().max_recent_interactions == 1000


def test_one_entry_per_movie_with_its_latest_rating():
    interactions = [Interaction("1", 4.0, 100), Interaction("2", 0.0, 50), Interaction("1", 2.0, 90),
                    Interaction("3", 5.0, 10), Interaction("3", 0.0, 20), Interaction("2", 3.0, 40),
                    Interaction("4", 1.0, 7), Interaction("4", 2.0, 7)]
    assert check_interactions(interactions) == (("1", 4.0), ("2", 3.0), ("3", 5.0), ("4", 2.0))
    with pytest.raises(InvalidRequest, match=r"recent_interactions\[0\]\.rating"):
        check_interactions([Interaction("1", 5.5)])


def test_models_without_history_towers_serve_unknown_users_the_fallback(models_dir, popular, served_backend):
    """Id-only towers (the `seed` preset) cannot use interactions: an unknown user still gets the fallback."""

    class IdOnly(CatalogStore):
        def get(self, model_version):
            return dataclasses.replace(super().get(model_version), serves_interactions=False)

    query = Query(NEW_USER, k=4, recent_interactions=((popular[5], 5.0),))
    result = Pipeline(served_backend, IdOnly(models_dir)).recommend([query])
    assert all(item.fallback for item in result[0].items)
    assert popular[5] not in _ids(result[0].items)


def test_the_cli_sends_interactions(running_server, capsys, popular):
    _, port = running_server
    target = f"127.0.0.1:{port}"
    assert client_main(["recommend", "--target", target, "--user", NEW_USER, "-k", "3", "--json",
                        "--interaction", f"{popular[0]}:4.5", "--interaction", popular[1]]) == 0
    items = json.loads(capsys.readouterr().out)
    assert len(items) == 3 and not any(item.get("fallback") for item in items)
    too_long = "x" * 200  # a well-formed argument the server refuses: the CLI reports its status
    assert client_main(["recommend", "--target", target, "--user", NEW_USER, "--interaction", f"{too_long}:4"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    for malformed in ("50:lots", "50:9"):
        with pytest.raises(SystemExit):
            client_main(["recommend", "--target", target, "--user", "42", "--interaction", malformed])
