"""The exported SavedModels: round-trip fidelity, pinned signatures, TF Serving-style loading."""
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.config import model_server_config_pb2

from recsys.export.examples import from_rows
from recsys.export.item_item import ease_weights, history_matrix
from recsys.export.presets import PRESETS
from recsys.server.layout import complete_versions
from tests.tf_serving.c_api import SavedModelSession

USERS = ["1", "42", "405", "943", "no-such-user"]


@pytest.fixture(scope="module")
def loaded(models_dir, trained):
    version = trained[1].version
    return (tf.saved_model.load(str(models_dir / "retrieval" / str(version))),
            tf.saved_model.load(str(models_dir / "ranking" / str(version))))


def test_layout_and_models_config(models_dir, trained):
    assert trained[1].version == 1
    assert complete_versions(models_dir) == [1]
    config = text_format.Parse((models_dir / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    entries = {entry.name: entry for entry in config.model_config_list.config}
    assert set(entries) == {"retrieval", "ranking"}
    for name, entry in entries.items():
        assert entry.base_path == str((models_dir / name).resolve())
        assert entry.model_platform == "tensorflow"


USER_SIDE = {"user_id": ([None], tf.string), "interaction_item_ids": ([None, None], tf.string),
             "interaction_ratings": ([None, None], tf.float32)}


def _inputs(signature) -> dict[str, tuple[list, tf.DType]]:
    return {name: (spec.shape.as_list(), spec.dtype) for name, spec in signature.structured_input_signature[1].items()}


def test_retrieval_signatures_are_pinned(loaded, trained):
    retrieval, _ = loaded
    assert set(retrieval.signatures) == {"serving_default", "include_rated", "similar_items", "rated_items"}
    candidate_count = trained[1].retrieval.candidate_count
    for name in ("serving_default", "include_rated"):
        signature = retrieval.signatures[name]
        assert _inputs(signature) == USER_SIDE
        outputs = signature.structured_outputs
        assert outputs["item_ids"].dtype == tf.string and outputs["scores"].dtype == tf.float32
        assert outputs["item_ids"].shape.as_list() == [None, candidate_count]


def test_rated_items_is_pinned_and_is_the_training_history(loaded, models_dir, split):
    """Who rated what is in the graph, not in the metadata: the popularity fill asks `rated_items`."""
    retrieval, _ = loaded
    signature = retrieval.signatures["rated_items"]
    assert _inputs(signature) == {"user_id": ([None], tf.string)}
    assert {name: (t.dtype, t.shape.as_list()) for name, t in signature.structured_outputs.items()} == {
        "item_ids": (tf.string, [None, None])}
    fit = from_rows(split[0])
    rows = signature(user_id=tf.constant(USERS))["item_ids"].numpy().astype(str).tolist()
    for user, row in zip(USERS, rows):
        assert sorted(item for item in row if item) == sorted(fit.rated_item_ids.get(user, [])), user
    assert not any(rows[-1]), "an unknown id has no history"
    metadata = (models_dir / "metadata" / "1.json").read_text()
    assert "rated_item_ids" not in metadata and '"user_ids"' in metadata


def test_ranking_signature_is_pinned(loaded):
    _, ranking = loaded
    assert set(ranking.signatures) == {"serving_default", "explain"}
    signature = ranking.signatures["serving_default"]
    assert _inputs(signature) == {**USER_SIDE, "item_ids": ([None, None], tf.string)}
    assert {name: (t.dtype, t.shape.as_list()) for name, t in signature.structured_outputs.items()} == {
        "predicted_rating": (tf.float32, [None, None]), "score": (tf.float32, [None, None])}


def user_side(users: list[str], interactions: list[tuple[str, float]] = ()) -> dict[str, tf.Tensor]:
    """The signatures' user inputs, the same interactions for every user."""
    return {"user_id": tf.constant(users),
            "interaction_item_ids": tf.constant([[item for item, _ in interactions]] * len(users), tf.string,
                                                shape=[len(users), len(interactions)]),
            "interaction_ratings": tf.constant([[stars for _, stars in interactions]] * len(users), tf.float32,
                                               shape=[len(users), len(interactions)])}


def _op_types(signature) -> set[str]:
    graph = signature.graph.as_graph_def()
    return {node.op for node in graph.node} | {node.op for function in graph.library.function
                                               for node in function.node_def}


def test_signatures_run_no_checks_or_branches_per_request(loaded):
    # They would run on every request: a conditional Assert re-checking the rated-movie
    # table's row splits cost ~6% of an in-process request.
    retrieval, ranking = loaded
    for signature in (*retrieval.signatures.values(), *ranking.signatures.values()):
        assert not _op_types(signature) & {"Assert", "If", "StatelessIf", "Switch", "While", "StatelessWhile"}


def test_retrieval_round_trip_matches(loaded, trained):
    retrieval, _ = loaded
    module = trained[1].retrieval
    for interactions in ([], [("1", 4.0), ("50", 0.0)]):
        inputs = user_side(USERS, interactions)
        for restored, original in ((retrieval.signatures["serving_default"], module.retrieve),
                                   (retrieval.signatures["include_rated"], module.retrieve_including_rated)):
            before, after = original(**inputs), restored(**inputs)
            np.testing.assert_array_equal(before["item_ids"].numpy(), after["item_ids"].numpy())
            np.testing.assert_allclose(before["scores"].numpy(), after["scores"].numpy(), rtol=1e-6, atol=1e-6)


def test_ranking_round_trip_matches(loaded, trained):
    _, ranking = loaded
    items = tf.constant([["1", "50", "181"], ["1682", "nope", "1"], ["2", "3", "4"], ["5", "6", "7"], ["8", "9", "10"]])
    for interactions in ([], [("1", 4.0), ("50", 0.0)]):
        inputs = {**user_side(USERS, interactions), "item_ids": items}
        before = trained[1].ranking.rank(**inputs)
        after = ranking.signatures["serving_default"](**inputs)
        for key in ("predicted_rating", "score"):
            np.testing.assert_allclose(before[key].numpy(), after[key].numpy(), rtol=1e-6, atol=1e-6)
        assert np.all((after["predicted_rating"].numpy() > 0) & (after["predicted_rating"].numpy() < 6))


def test_precomputed_tables_serve_what_the_trained_towers_compute(loaded, trained, split, movielens):
    """Users without interactions are served from the towers' outputs per user; they must be the trained models'."""
    retrieval, ranking = loaded
    result = trained[1]
    users = ["1", "1", "42", "943", "unknown"]
    items = ["1", "50", "181", "1682", "nope"]
    features = {"user_id": tf.constant(users), "item_id": tf.constant(items)}
    model = result.ranking_model
    served = ranking.signatures["serving_default"](**user_side(users), item_ids=tf.constant(items)[:, None])
    np.testing.assert_allclose(served["predicted_rating"].numpy()[:, 0], model(features)[:, 0].numpy(),
                               rtol=1e-4, atol=1e-4)
    towers = result.retrieval_model
    watch_logit = tf.reduce_sum(model.watch_user_model(features["user_id"]) * model.watch_item_model(features["item_id"]),
                                axis=1)
    expected_score = watch_logit + tf.reduce_sum(
        towers.user_model(features["user_id"]) * towers.item_model(features["item_id"]), axis=1)
    preset, fit = PRESETS["tiny"], from_rows(split[0])
    catalog = sorted(movielens.items, key=int)
    ease = ease_weights(history_matrix(fit.user_ids, catalog, fit.rated_item_ids), preset.ease_lambda)
    for row, (user, item) in enumerate(zip(users, items)):
        if user in fit.rated_item_ids and item in catalog:  # unknown users and movies score 0 here
            history = [catalog.index(rated) for rated in fit.rated_item_ids[user]]
            expected_score = tf.tensor_scatter_nd_add(expected_score, [[row]], [
                preset.ease_weight * ease[history, catalog.index(item)].sum()])
    np.testing.assert_allclose(served["score"].numpy()[:, 0], expected_score.numpy(), rtol=1e-4, atol=1e-3)

    catalog = result.retrieval.item_ids.numpy()
    everything = tf.matmul(towers.index_user_model(tf.constant(users)), towers.index_item_model(tf.constant(catalog)),
                           transpose_b=True).numpy()
    candidates = retrieval.signatures["include_rated"](**user_side(users))
    top = np.sort(everything, axis=1)[:, ::-1][:, :candidates["scores"].shape[1]]
    np.testing.assert_allclose(candidates["scores"].numpy(), top, rtol=1e-4, atol=1e-4)


def test_rated_movies_are_excluded_for_the_heaviest_user(loaded, trained, heaviest_user, split):
    retrieval, _ = loaded
    rated = {str(item) for user, item in split[0][:, :2] if str(user) == heaviest_user}
    assert len(rated) > trained[1].retrieval.candidate_count, "more rated movies than candidates"
    result = retrieval.signatures["serving_default"](**user_side([heaviest_user]))
    candidates = set(result["item_ids"].numpy()[0].astype(str))
    assert len(candidates) == result["item_ids"].shape[1], "candidates must be distinct"
    assert not candidates & rated
    everything = retrieval.signatures["include_rated"](**user_side([heaviest_user]))
    assert set(everything["item_ids"].numpy()[0].astype(str)) & rated, "include_rated keeps rated movies"


def cpp_run(model_path, feeds_by_key, output_keys, signature="serving_default", loaded=None):
    """What TF Serving does: TensorFlow's C++ loader into a session (through the C API), then
    Session::Run on the signature's tensor names. `loaded`: a session already open on model_path."""
    session = loaded or SavedModelSession(model_path)
    try:
        signature_def = session.meta_graph.signature_def[signature]
        feeds = {signature_def.inputs[key].name: tf.make_tensor_proto(
            value, dtype=tf.string if np.asarray(value).dtype.kind in "OS" else None)
            for key, value in feeds_by_key.items()}
        outputs = session.run(feeds, [signature_def.outputs[key].name for key in output_keys])
        return {key: tf.make_ndarray(proto) for key, proto in zip(output_keys, outputs)}
    finally:
        if loaded is None:
            session.close()


def numpy_inputs(inputs: dict[str, tf.Tensor]) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in inputs.items()}


def test_tf_serving_style_loading_matches_tf2(models_dir, loaded):
    retrieval, ranking = loaded
    for interactions in ([], [("1", 5.0), ("2", 0.0), ("not-a-movie", 3.0)]):
        inputs = user_side(USERS, interactions)
        for signature in ("serving_default", "include_rated"):
            session_out = cpp_run(models_dir / "retrieval" / "1", numpy_inputs(inputs), ["item_ids", "scores"],
                                  signature)
            eager_out = retrieval.signatures[signature](**inputs)
            np.testing.assert_array_equal(session_out["item_ids"], eager_out["item_ids"].numpy())
            np.testing.assert_allclose(session_out["scores"], eager_out["scores"].numpy(), rtol=1e-5, atol=1e-5)
        ranking_inputs = {**inputs, "item_ids": tf.constant([["1", "2", "3"]] * len(USERS))}
        session_out = cpp_run(models_dir / "ranking" / "1", numpy_inputs(ranking_inputs), ["predicted_rating", "score"])
        eager_out = ranking.signatures["serving_default"](**ranking_inputs)
        np.testing.assert_allclose(session_out["score"], eager_out["score"].numpy(), rtol=1e-5, atol=1e-5)


def test_warmup_records_are_prediction_logs_that_run(models_dir):
    signatures = set()
    for model in ("retrieval", "ranking"):
        session = SavedModelSession(models_dir / model / "1")
        path = models_dir / model / "1" / "assets.extra" / "tf_serving_warmup_requests"
        records = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
        assert 3 <= len(records) <= 20
        with_interactions = 0
        for record in records:
            log = prediction_log_pb2.PredictionLog.FromString(record)
            request = log.predict_log.request
            assert request.model_spec.name == model
            feeds = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
            signature = request.model_spec.signature_name or "serving_default"
            signatures.add(signature)
            outputs = {"retrieval": ["item_ids", "scores"], "ranking": ["predicted_rating", "score"]}[model]
            if signature == "explain":
                outputs = ["because_item_ids", "because_scores"]
            if signature == "rated_items":
                assert set(feeds) == {"user_id"}
                outputs = ["item_ids"]
            else:
                with_interactions += feeds["interaction_item_ids"].shape[1] > 0
            result = cpp_run(models_dir / model / "1", feeds, outputs, signature, session)
            assert len(result[outputs[0]]) == len(feeds["user_id"])
        session.close()
        assert with_interactions >= 2, "warmup exercises the interaction path too"
    assert signatures == {"serving_default", "include_rated", "similar_items", "rated_items", "explain"}, \
        "every signature is warmed"


def test_a_second_export_gets_the_next_version_and_keeps_the_first(tmp_path, trained):
    from recsys.export.savedmodel import next_version

    (tmp_path / "retrieval" / "3").mkdir(parents=True)
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "4.json").write_text("{}")
    assert next_version(tmp_path) == 5


def test_sizes_accounts_for_every_table_by_what_it_grows_with(models_dir, split, capsys):
    """`python -m recsys.export sizes`: every variable counted once; the history costs 8 bytes a
    rating in each model (int32 movie row + float32 stars); users and movies as the export has them."""
    from recsys.export.__main__ import main as export_cli
    from recsys.export.sizes import model_sizes

    fit = from_rows(split[0])
    sizes = {entry.model: entry for entry in model_sizes(models_dir)}
    for model, entry in sizes.items():
        reader = tf.train.load_checkpoint(str(models_dir / model / "1" / "variables" / "variables"))
        total = sum(reader.get_variable_to_dtype_map()[name].size * int(np.prod(shape))
                    for name, shape in reader.get_variable_to_shape_map().items()
                    if name.endswith(".ATTRIBUTES/VARIABLE_VALUE"))
        assert sum(entry.bytes_by_kind.values()) == total, model
        assert entry.units["per user"] == len(fit.user_ids)
        assert entry.units["per rating"] == sum(map(len, fit.rated_item_ids.values()))
        assert entry.per_unit("per rating") == 8.0
        assert entry.bytes_by_kind["per user"] > 0 and entry.bytes_by_kind["per movie"] > 0
    assert export_cli(["sizes", "--models", str(models_dir), "--model-version", "9"]) == 2
    assert "holds no complete version 9" in capsys.readouterr().err
    assert export_cli(["sizes", "--models", str(models_dir)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in printed if line.split()[1:2] == ["total"]] == [["retrieval", "total"],
                                                                                      ["ranking", "total"]]
