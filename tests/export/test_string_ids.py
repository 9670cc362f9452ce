"""A catalog of one's own with string ids, made by `python -m recsys.export synth`, through the CLI a user
runs: trained, evaluated against ALS, served over gRPC in process and through the TF Serving stand-in."""
import json

import pytest

from recsys.client import RecommenderClient
from recsys.export.__main__ import main as export_cli
from recsys.export.data import fit_and_held_out, load_csv
from recsys.server.app import create_server
from recsys.server.in_process import InProcessBackend
from recsys.server.options import ServerOptions
from recsys.server.tf_serving import TFServingBackend
from tests.conftest import start_tf_serving, stop_process


@pytest.fixture(scope="module")
def string_catalog(tmp_path_factory):
    out = tmp_path_factory.mktemp("string-ids")
    assert export_cli(["synth", "--users", "2000", "--items", "1000", "--ratings", "100000", "--seed", "5",
                       "--out", str(out / "data")]) == 0
    data = ["--dataset", "csv", "--ratings", str(out / "data" / "ratings.csv"), "--items", str(out / "data" / "items.csv")]
    assert export_cli(["train", *data, "--preset", "tiny", "--out", str(out / "models")]) == 0
    assert export_cli(["evaluate", *data, "--models", str(out / "models"), "--json", str(out / "metrics.json")]) == 0
    return out


@pytest.mark.slow
def test_string_ids_train_and_score_at_least_als(string_catalog):
    metrics = json.loads((string_catalog / "metrics.json").read_text())
    systems = metrics["systems"]
    assert metrics["users"] > 1_900
    assert systems["two_stage"]["hr@10"] >= systems["als"]["hr@10"] > systems["popularity"]["hr@10"]
    assert systems["ease"]["hr@10"] > 1.5 * systems["popularity"]["hr@10"]


def _ask(client, user, rated):
    served = client.recommend(user, k=10)
    assert len(served) == 10 and all(item.item_id.startswith("sku-") and item.title for item in served)
    assert not {item.item_id for item in served} & rated, "the user's history is excluded"
    return [item.item_id for item in served]


@pytest.mark.slow
def test_string_ids_are_served_in_process_and_through_tf_serving(string_catalog):
    models = string_catalog / "models"
    data = load_csv(string_catalog / "data" / "ratings.csv", string_catalog / "data" / "items.csv")
    train = fit_and_held_out(data.ratings, "test")[0]
    user_code = int(train[0, 0])
    user = data.names.users[user_code]
    rated = set(data.names.item_ids(train[train[:, 0] == user_code][:, 1]))
    tf_serving, tf_port = start_tf_serving(models / "models.config")
    servers = []
    try:
        lists = []
        for backend in (InProcessBackend(models), TFServingBackend(f"127.0.0.1:{tf_port}", models)):
            recommender, port = create_server("127.0.0.1:0", backend, models, ServerOptions(poll_seconds=0.3))
            recommender.start()
            servers.append(recommender)
            with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
                client.wait_until_serving(60)
                lists.append(_ask(client, user, rated))
                similar = client.similar(lists[-1][0], k=5)
                assert len(similar) == 5 and all(item.item_id.startswith("sku-") for item in similar)
        assert lists[0] == lists[1], "the same list through TF Serving"
    finally:
        for recommender in servers:
            recommender.stop(0).wait()
        stop_process(tf_serving)
