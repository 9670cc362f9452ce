"""A retrieval SavedModel whose indexes are partitioned: the same contract as brute force, through
TensorFlow 2, the C++ loader TF Serving uses, and the real server."""
import json

import numpy as np
import pytest
import tensorflow as tf

from recsys.client import RecommenderClient
from recsys.export.index import IndexSpec
from recsys.export.savedmodel import write_export
from recsys.export.serving import RetrievalServing
from tests.conftest import start_server_process, stop_process
from tests.export.test_savedmodel import USERS, _op_types, cpp_run, numpy_inputs, user_side
from tests.tf_serving.c_api import SavedModelSession

CELLS, PROBES = 8, 3


@pytest.fixture(scope="module")
def partitioned(trained, tmp_path_factory):
    """The trained models of the test run, their retrieval and SimilarItems indexes partitioned, exported
    with the same ranking and metadata; the directory and the retrieval module."""
    models_dir, export = trained
    brute = export.retrieval
    spec = IndexSpec("partitioned", CELLS, PROBES)
    module = RetrievalServing(brute.history, brute.user_tower, brute.index.item_embeddings.numpy(),
                              brute.item_ids.numpy().astype(str).tolist(), brute.candidate_count,
                              brute.neighbours.item_embeddings.numpy(), index=spec, similar_index=spec)
    metadata = json.loads((models_dir / "metadata" / "1.json").read_text())
    metadata["indexes"] = module.index_records()
    target = tmp_path_factory.mktemp("partitioned")
    write_export(target, module, export.ranking, metadata, warmup_user_ids=USERS[:4])
    return target, module, tf.saved_model.load(str(target / "retrieval" / "1"))


def test_the_metadata_records_what_was_built_and_its_recall(partitioned):
    target, module, _ = partitioned
    record = json.loads((target / "metadata" / "1.json").read_text())["indexes"]
    assert record["retrieval"]["kind"] == record["similar_items"]["kind"] == "partitioned"
    assert (record["retrieval"]["cells"], record["retrieval"]["probes"]) == (CELLS, PROBES)
    assert record["retrieval"]["probed_movies"] == PROBES * module.index.cell_size
    assert 0.5 < record["retrieval"]["recall"] <= 1.0


def test_every_retrieval_signature_runs_through_the_cpp_loader_as_in_tensorflow(partitioned):
    target, _, loaded = partitioned
    path = target / "retrieval" / "1"
    session = SavedModelSession(path)
    try:
        for interactions in ([], [("1", 5.0), ("2", 0.0), ("not-a-movie", 3.0)]):
            inputs = user_side(USERS, interactions)
            for signature in ("serving_default", "include_rated"):
                session_out = cpp_run(path, numpy_inputs(inputs), ["item_ids", "scores"], signature, loaded=session)
                eager_out = loaded.signatures[signature](**inputs)
                np.testing.assert_array_equal(session_out["item_ids"], eager_out["item_ids"].numpy())
                np.testing.assert_allclose(session_out["scores"], eager_out["scores"].numpy(), rtol=1e-5, atol=1e-5)
            similar_inputs = {**inputs, "item_id": tf.constant(["1"] * len(USERS))}
            session_out = cpp_run(path, numpy_inputs(similar_inputs), ["item_ids"], "similar_items", loaded=session)
            np.testing.assert_array_equal(session_out["item_ids"],
                                          loaded.signatures["similar_items"](**similar_inputs)["item_ids"].numpy())
        rated = cpp_run(path, {"user_id": np.array(USERS, object)}, ["item_ids"], "rated_items", loaded=session)
        np.testing.assert_array_equal(rated["item_ids"],
                                      loaded.signatures["rated_items"](user_id=tf.constant(USERS))["item_ids"])
    finally:
        session.close()


def test_signatures_run_no_checks_or_branches_per_request(partitioned):
    *_, loaded = partitioned
    for signature in loaded.signatures.values():
        assert not _op_types(signature) & {"Assert", "If", "StatelessIf", "Switch", "While", "StatelessWhile"}


def test_the_history_and_the_sent_movies_are_excluded(partitioned, heaviest_user, split):
    *_, loaded = partitioned
    rated = {str(item) for user, item in split[0][:, :2] if str(user) == heaviest_user}
    sent = [("1", 4.0), ("2", 0.0)]
    result = loaded.signatures["serving_default"](**user_side([heaviest_user, "no-such-user"], sent))
    for row, scores, excluded in zip(result["item_ids"].numpy().astype(str), result["scores"].numpy(),
                                     (rated | {"1", "2"}, {"1", "2"})):
        kept = [item for item, score in zip(row, scores) if score != -np.inf]
        assert kept and not set(kept) & excluded
        assert len(set(kept)) == len(kept), "candidates are distinct"
    everything = loaded.signatures["include_rated"](**user_side([heaviest_user]))
    assert set(everything["item_ids"].numpy()[0].astype(str)) & rated, "include_rated keeps rated movies"


def test_similar_items_skips_the_movie_and_the_history(partitioned, heaviest_user, split):
    *_, loaded = partitioned
    rated = {str(item) for user, item in split[0][:, :2] if str(user) == heaviest_user}
    inputs = {**user_side(["", heaviest_user]), "item_id": tf.constant(["1", "1"])}
    result = loaded.signatures["similar_items"](**inputs)
    for row, scores, excluded in zip(result["item_ids"].numpy().astype(str), result["scores"].numpy(),
                                     ({"1"}, rated | {"1"})):
        kept = [item for item, score in zip(row, scores) if score != -np.inf]
        assert kept and not set(kept) & excluded


def test_the_partitioned_candidates_are_mostly_brute_forces(partitioned, trained):
    _, module, loaded = partitioned
    users = tf.constant(USERS[:4])
    found = loaded.signatures["include_rated"](**user_side(USERS[:4]))["item_ids"].numpy()
    exact = loaded.exhaustive_candidates(users)["item_ids"].numpy()
    brute = trained[1].retrieval.retrieve_including_rated(**user_side(USERS[:4]))["item_ids"].numpy()
    np.testing.assert_array_equal(exact, brute)
    overlap = np.mean([len(set(row) & set(reference)) / len(reference) for row, reference in zip(found, exact)])
    assert overlap > 0.5


def test_the_server_reports_the_index_it_serves(partitioned):
    target, module, _ = partitioned
    process, port = start_server_process(target)
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.wait_until_serving(60)
            info = client.model_info()
            assert (info.retrieval_index, info.index_cells, info.index_probes) == ("partitioned", CELLS, PROBES)
            assert info.index_movies == module.index.catalog_size
            assert info.index_recall == pytest.approx(module.index_records()["retrieval"]["recall"], abs=1e-6)
            items = client.recommend(USERS[0], k=10)
            assert len(items) == 10 and len({item.item_id for item in items}) == 10
    finally:
        stop_process(process)
