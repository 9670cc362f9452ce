"""SimilarItems and the reasons on Recommend, on the wire: real server, generated client, real SavedModels."""
import json

import grpc
import numpy as np
import pytest

from recsys.client.__main__ import main as client_main
from recsys.export.item_item import co_rating_factors, history_matrix
from recsys.server.catalog import CatalogStore
from tests.conftest import status_of


@pytest.fixture(scope="module")
def catalog(models_dir):
    return CatalogStore(models_dir).get("1")


def _ids(items) -> list[str]:
    return [item.item_id for item in items]


def test_similar_items_are_the_nearest_by_cosine_in_the_co_rating_space(client, catalog, movielens, split):
    items = client.similar("1", k=10)
    assert len(items) == 10 and "1" not in _ids(items)
    assert [item.rank for item in items] == list(range(1, 11))
    similarity = [item.score for item in items]
    assert similarity == sorted(similarity, reverse=True) and all(-1.0 <= s <= 1.0001 for s in similarity)
    assert all(item.retrieval_score == item.score and item.predicted_rating == 0 and not item.fallback for item in items)
    assert all(item.title == catalog.titles[item.item_id] for item in items)
    # The same neighbours, computed here from the training ratings the export saw.
    from recsys.export.examples import from_rows

    fit, movies = from_rows(split[0]), sorted(movielens.items, key=int)
    factors, _ = co_rating_factors(history_matrix(fit.user_ids, movies, fit.rated_item_ids), 64)
    unit = factors / np.linalg.norm(factors, axis=1, keepdims=True)
    cosine = unit @ unit[movies.index("1")]
    cosine[movies.index("1")] = -np.inf
    expected = [movies[n] for n in np.argsort(-cosine, kind="stable")[:10]]
    assert _ids(items) == expected
    np.testing.assert_allclose(similarity, np.sort(cosine)[::-1][:10], rtol=1e-4, atol=1e-5)


def test_similar_items_for_a_user_leave_out_their_history_and_are_ordered_for_them(client, split):
    rated = {str(item) for user, item in split[0][:, :2].tolist() if user == 42}
    plain = client.similar("1", k=50)
    mine = client.similar("1", k=10, user_id="42")
    assert len(mine) == 10 and not rated & set(_ids(mine)) and "1" not in _ids(mine)
    assert set(_ids(mine)) <= set(_ids(plain)) | set(_ids(client.similar("1", k=100)))
    scores = [item.score for item in mine]
    assert scores == sorted(scores, reverse=True), "ordered by the ranker's score for the user"
    assert all(item.predicted_rating > 0 for item in mine)
    assert _ids(client.similar("1", k=10, user_id="42", exclude=_ids(mine[:3])))[:7] == _ids(mine[3:])


@pytest.mark.parametrize("call, code, message", [
    (lambda c: c.similar("no-such-movie"), grpc.StatusCode.NOT_FOUND, "item_id 'no-such-movie' is not a movie"),
    (lambda c: c.similar(""), grpc.StatusCode.INVALID_ARGUMENT, "item_id must not be empty"),
    (lambda c: c.similar("1", k=101), grpc.StatusCode.INVALID_ARGUMENT, "k=101 exceeds the maximum of 100"),
    (lambda c: c.similar("1", user_id="x" * 129), grpc.StatusCode.INVALID_ARGUMENT, "user_id is 129 characters"),
])
def test_similar_items_errors(client, call, code, message):
    got, details = status_of(lambda: call(client))
    assert got == code and message in details


def test_every_model_item_has_reasons_from_the_users_history(client, split):
    rated = {str(item) for user, item in split[0][:, :2].tolist() if user == 42}
    items = client.recommend("42", k=20)
    assert all(1 <= len(item.because_item_ids) <= 3 for item in items)
    assert all(set(item.because_item_ids) <= rated for item in items)
    assert all(item.item_id not in item.because_item_ids for item in items)
    assert all(len(item.because_titles) == len(item.because_item_ids) and all(item.because_titles) for item in items)
    sent = client.recommend("42", k=10, interactions=[("2", 5.0)])
    assert any("2" in item.because_item_ids for item in sent), "what the user just did is a reason too"
    cold = client.recommend("someone-new", k=5)
    assert all(item.fallback and not item.because_item_ids for item in cold), "no reasons for the fallback"
    new = client.recommend("someone-new", k=5, interactions=[("1", 5.0), ("50", 4.0)])
    assert all(set(item.because_item_ids) <= {"1", "50"} and item.because_item_ids for item in new)


def test_reasons_are_the_largest_shares_of_the_score(client, models_dir):
    """The reasons, recomputed from the served graph's own parts: each history movie's share."""
    import tensorflow as tf

    from tests.export.test_savedmodel import user_side

    ranking = tf.saved_model.load(str(models_dir / "ranking" / "1"))
    items = client.recommend("7", k=5)
    explained = ranking.signatures["explain"](**user_side(["7"]), item_ids=tf.constant([_ids(items)]))
    shares = explained["because_scores"].numpy()[0]
    assert all(list(row) == sorted(row, reverse=True) for row in shares) and (shares[:, 0] > 0).all()
    assert [list(item.because_item_ids) for item in items] == [
        [reason for reason in row.astype(str) if reason] for row in explained["because_item_ids"].numpy()[0]]


def test_without_reasons_the_field_is_empty(models_dir, served_backend):
    from recsys.client import RecommenderClient
    from recsys.server.app import create_server
    from recsys.server.options import ServerOptions

    recommender, port = create_server("127.0.0.1:0", served_backend, models_dir,
                                      ServerOptions(poll_seconds=0.5, reasons=False))
    recommender.start()
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as quiet:
            quiet.wait_until_serving(60)
            assert not any(item.because_item_ids for item in quiet.recommend("42"))
    finally:
        recommender.stop(0).wait()


def test_the_cli_shows_reasons_by_title_and_similar_movies(running_server, capsys, catalog):
    _, port = running_server
    target = f"127.0.0.1:{port}"
    assert client_main(["recommend", "--target", target, "--user", "42", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("because you watched") == 3
    assert client_main(["similar", "--target", target, "--item", "1", "-k", "4", "--json"]) == 0
    similar = json.loads(capsys.readouterr().out)
    assert len(similar) == 4 and all(item["title"] == catalog.titles[item["item_id"]] for item in similar)
    assert client_main(["similar", "--target", target, "--item", "no-such-movie"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
