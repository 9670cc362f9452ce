"""A catalog of about 100,000 movies: export chooses the partitioned index, which finds what brute
force finds, loads in the C++ loader TF Serving uses, and keeps excluding each user's history."""
import json

import numpy as np
import pytest
import tensorflow as tf

from recsys.export.presets import PRESETS
from recsys.export.scale import PARTITIONED_MIN_MOVIES, RECALL_TARGET
from recsys.export.train import train_and_export
from tests.export.test_savedmodel import USERS, cpp_run, numpy_inputs, user_side
from tests.tf_serving.c_api import SavedModelSession

pytestmark = pytest.mark.slow

SYNTHETIC_ITEMS = 100_000


@pytest.fixture(scope="module")
def large(movielens, tmp_path_factory):
    models_dir = tmp_path_factory.mktemp("catalog-scale")
    export = train_and_export(movielens, PRESETS["tiny"], models_dir, synthetic_items=SYNTHETIC_ITEMS)
    retrieval = tf.saved_model.load(str(models_dir / "retrieval" / "1"))
    return models_dir, export, retrieval


def test_a_large_catalog_gets_the_partitioned_index_with_its_recall_recorded(large, movielens):
    models_dir, export, _ = large
    record = json.loads((models_dir / "metadata" / "1.json").read_text())["indexes"]["retrieval"]
    assert record["movies"] == len(movielens.item_ids) + SYNTHETIC_ITEMS > PARTITIONED_MIN_MOVIES
    assert record["kind"] == "partitioned" and record["recall"] >= RECALL_TARGET
    assert record["probed_movies"] < record["movies"] / 5, "a query scores a small share of the catalog"
    assert 0 < record["partitioned_ms"] < record["brute_force_ms"], "timed against brute force at export: the faster"


def test_the_partitioned_index_finds_what_brute_force_finds_for_every_trained_user(large, movielens):
    _, export, retrieval = large
    users = export.retrieval.history.user_lookup.get_vocabulary()[1:]
    shares = []
    for start in range(0, len(users), 100):
        batch = users[start:start + 100]
        found = retrieval.signatures["include_rated"](**user_side(batch))["item_ids"].numpy()
        exact = retrieval.exhaustive_candidates(tf.constant(batch))["item_ids"].numpy()
        shares += [len(set(row) & set(reference)) / len(reference) for row, reference in zip(found, exact)]
    assert np.mean(shares) >= 0.9
    assert np.quantile(shares, 0.1) >= 0.7, "no large group of users is served far worse"


def test_every_signature_runs_in_the_cpp_loader(large):
    models_dir, _, retrieval = large
    path = models_dir / "retrieval" / "1"
    session = SavedModelSession(path)
    try:
        inputs = user_side(USERS, [("1", 5.0), ("2", 0.0)])
        for signature in ("serving_default", "include_rated"):
            out = cpp_run(path, numpy_inputs(inputs), ["item_ids", "scores"], signature, loaded=session)
            np.testing.assert_array_equal(out["item_ids"], retrieval.signatures[signature](**inputs)["item_ids"].numpy())
        similar = {**inputs, "item_id": tf.constant(["1"] * len(USERS))}
        out = cpp_run(path, numpy_inputs(similar), ["item_ids"], "similar_items", loaded=session)
        np.testing.assert_array_equal(out["item_ids"], retrieval.signatures["similar_items"](**similar)["item_ids"].numpy())
        out = cpp_run(path, {"user_id": np.array(USERS, object)}, ["item_ids"], "rated_items", loaded=session)
        assert out["item_ids"].shape[0] == len(USERS)
    finally:
        session.close()


def test_the_history_stays_excluded(large, heaviest_user, split):
    *_, retrieval = large
    rated = {str(item) for user, item in split[0][:, :2] if str(user) == heaviest_user}
    result = retrieval.signatures["serving_default"](**user_side([heaviest_user], [("1", 4.0)]))
    kept = [item for item, score in zip(result["item_ids"].numpy()[0].astype(str), result["scores"].numpy()[0])
            if score != -np.inf]
    assert len(kept) == result["item_ids"].shape[1], "a probed catalog this large has candidates to spare"
    assert not set(kept) & (rated | {"1"})
