"""The interaction store against the real thing: an SQLite file and a PostgreSQL server; then on the wire:
RecordInteractions and ForgetUser change lists at once, survive kill -9, and an outage costs Recommend nothing."""
import json
import logging
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import pytest

from recsys.client import RecommenderClient
from recsys.server.app import create_server
from recsys.server.catalog import CatalogStore
from recsys.server.errors import StoreUnavailable
from recsys.server.in_process import InProcessBackend
from recsys.server.options import ServerOptions
from recsys.server.store import MIGRATIONS, open_store
from recsys.server.validation import Interaction
from recsys.v1 import recommender_pb2
from tests.conftest import STORE_READ_SECONDS, start_server_process, status_of, stop_process, wait_for

NEW_USER = "new-user-7"


@pytest.fixture()
def store(store_location):
    opened = open_store(store_location)
    yield opened
    opened.close()


def test_one_row_per_movie_with_the_latest_rating(store):
    assert store.record("u", [Interaction("1", 4.0, 100), Interaction("2", 0.0, 200), Interaction("1", 2.0, 50),
                              Interaction("3", 5.0, 300)]) == 3
    assert store.record("u", [Interaction("2", 3.5, 150), Interaction("3", 0.0, 400)]) == 2  # a rating for 2; a re-watch of 3
    assert store.recent(["u"], 10) == {"u": [Interaction("3", 5.0, 400), Interaction("2", 3.5, 200),
                                             Interaction("1", 4.0, 100)]}
    assert store.record("u", [Interaction("1", 1.0, 99)]) == 1  # older than the rating stored: kept as it was
    assert store.recent(["u"], 10)["u"][-1] == Interaction("1", 4.0, 100)


def test_training_reads_the_store_in_keyset_pages(store):
    """`export` in pages of 2 rows: every row once, in (user, movie) order, across page boundaries that
    fall inside one user's rows and between users."""
    store.record("b", [Interaction(movie, 4.0, 1) for movie in ("3", "1", "2")])
    store.record("a", [Interaction("9", 5.0, 1)])
    store.record("c", [Interaction("1", 3.0, 1), Interaction("5", 0.0, 2)])
    rows = [(user, movie) for user, movie, _, _ in store.export(page_rows=2)]
    assert rows == [("a", "9"), ("b", "1"), ("b", "2"), ("b", "3"), ("c", "1"), ("c", "5")]
    assert [row[:2] for row in store.export()] == rows


def test_a_retried_call_records_nothing_twice(store):
    call = [Interaction("1", 4.0, 0), Interaction("2", 0.0, 0), Interaction("5", 3.0, 1_000)]
    for _ in range(3):
        assert store.record("u", call) == 3
    assert len(store.recent(["u"], 100)["u"]) == 3
    assert sorted(row[1] for row in store.export()) == ["1", "2", "5"]
    assert all(entry.timestamp_seconds > 1_600_000_000 for entry in store.recent(["u"], 2)["u"]), "0 means now"


def test_newest_first_for_many_users_in_one_query(store):
    for user in ("a", "b", "c"):
        store.record(user, [Interaction(str(movie), 3.0, 1_000 + movie) for movie in range(1, 8)])
    recent = store.recent(["a", "c", "nobody", "a"], 3)
    assert set(recent) == {"a", "c"}
    assert [entry.item_id for entry in recent["a"]] == ["7", "6", "5"]
    assert store.recent(["a"], 0) == {} and store.recent([], 5) == {}


def test_forget_erases_one_user(store):
    store.record("a", [Interaction("1", 4.0, 1), Interaction("2", 5.0, 2)])
    store.record("b", [Interaction("1", 4.0, 1)])
    assert store.forget("a") == 2 and store.forget("a") == 0
    assert store.recent(["a", "b"], 10) == {"b": [Interaction("1", 4.0, 1)]}


def test_opening_again_migrates_nothing_and_keeps_the_data(store_location):
    first = open_store(store_location)
    first.record("u", [Interaction("1", 4.0, 1)])
    threads = [threading.Thread(target=lambda: open_store(store_location).close()) for _ in range(4)]
    for thread in threads:  # servers starting side by side
        thread.start()
    for thread in threads:
        thread.join()
    again = open_store(store_location)
    assert again.recent(["u"], 5) == {"u": [Interaction("1", 4.0, 1)]}
    assert again._run(lambda connection: _versions(connection)) == list(range(1, len(MIGRATIONS) + 1))
    first.close()
    again.close()


def _versions(connection) -> list[int]:
    cursor = connection.cursor()
    cursor.execute("SELECT version FROM schema_migrations ORDER BY version")
    versions = [row[0] for row in cursor.fetchall()]
    cursor.close()
    connection.rollback()
    return versions


def test_sqlite_is_in_wal_mode_with_full_sync(tmp_path):
    store = open_store(str(tmp_path / "s.sqlite3"))
    store.record("u", [Interaction("1", 4.0, 1)])
    mode = store._run(lambda connection: connection.execute("PRAGMA journal_mode").fetchone()[0])
    sync = store._run(lambda connection: connection.execute("PRAGMA synchronous").fetchone()[0])
    assert (mode, sync) == ("wal", 2)


def test_an_unusable_sqlite_path_fails_at_once(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        open_store(str(tmp_path / "file" / "interactions.sqlite3"))
    with pytest.raises(sqlite3.Error):
        open_store(str(tmp_path))  # a directory


def break_sqlite(path: Path) -> None:
    """A real failure: the database file is moved away and a directory takes its place."""
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{path}{suffix}").exists():
            Path(f"{path}{suffix}").rename(f"{path}{suffix}.away")
    path.mkdir()


def mend_sqlite(path: Path) -> None:
    path.rmdir()
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{path}{suffix}.away").exists():
            Path(f"{path}{suffix}.away").rename(f"{path}{suffix}")


# --- on the wire --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(request, models_dir, tmp_path_factory):
    """One server per kind of store for the module's tests (each test uses users of its own)."""
    if request.param == "sqlite":
        location = str(tmp_path_factory.mktemp("store") / "interactions.sqlite3")
    else:
        postgres = request.getfixturevalue("postgres")
        postgres.clear()
        location = postgres.url
    store = open_store(location)
    recommender, port = create_server("127.0.0.1:0", InProcessBackend(models_dir), models_dir,
                                      ServerOptions(poll_seconds=0.3, stored_interactions=50,
                                                    store_read_seconds=STORE_READ_SECONDS), store)
    recommender.start()
    client = RecommenderClient(f"127.0.0.1:{port}", timeout=10)
    client.wait_until_serving(60)
    yield client, recommender, store
    client.close()
    recommender.stop(0).wait()
    store.close()


def _ids(items) -> list[str]:
    return [item.item_id for item in items]


def test_recorded_interactions_change_the_list_at_once_and_forget_undoes_it(served):
    """A user the models do not know: recorded ratings personalise their list at once, and erasing
    them brings back the list of someone unknown (a trained user would be served as unknown from
    then on: tests/server/test_erasure.py)."""
    client, _, _ = served
    user = "recorded-then-forgotten"
    before = client.recommend(user, k=20)
    sent = [(item.item_id, 5.0) for item in before[:3]]
    assert client.record_interactions(user, sent) == 3
    try:
        after = client.recommend(user, k=20)
        assert after != before and not {item for item, _ in sent} & set(_ids(after))
        assert _ids(after) == _ids(client.recommend(user, k=20, interactions=sent)), "as if the caller had sent them"
    finally:
        assert client.forget_user(user) == 3
    assert _ids(client.recommend(user, k=20)) == _ids(before)


def test_a_new_user_records_ratings_and_gets_a_personalised_list(served, split, heaviest_user):
    client, _, _ = served
    user = "new-user-with-ratings"
    assert all(item.fallback for item in client.recommend(user))
    rows = split[0][split[0][:, 0] == int(heaviest_user)][:10]
    ratings = [(str(item), float(stars)) for _, item, stars, _ in rows.tolist()]
    assert client.record_interactions(user, ratings) == 10
    items = client.recommend(user)
    assert len(items) == 10 and not any(item.fallback for item in items)
    assert not {item for item, _ in ratings} & set(_ids(items))
    batch = client.recommend_batch([user, "42"], k=10)
    assert _ids(batch[0].items) == _ids(items)


def test_a_merged_batch_reads_the_store_once(served):
    client, recommender, store = served
    calls = []
    records = store.records
    store.records = lambda users, limit: calls.append(sorted(users)) or records(users, limit)
    client.recommend_batch(["1", "2", "3", NEW_USER], k=3)
    store.records = records
    assert calls == [["1", "2", "3", NEW_USER]]


def test_store_calls_are_validated_like_the_others(served):
    client, _, _ = served
    bad = recommender_pb2.RecordInteractionsRequest(user_id="42", interactions=[
        recommender_pb2.Interaction(item_id="1", rating=4.0), recommender_pb2.Interaction(item_id="2", rating=6.0)])
    code, details = status_of(lambda: client.stub.RecordInteractions(bad, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "interactions[1].rating is 6.0" in details
    code, details = status_of(lambda: client.forget_user(""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "user_id must not be empty" in details
    too_many = [(str(n), 3.0) for n in range(1001)]
    code, details = status_of(lambda: client.record_interactions("42", too_many))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "interactions has 1001 entries" in details
    info = client.model_info()
    assert info.interaction_store in ("sqlite", "postgresql") and info.stored_interactions == 50


def test_without_a_store_the_store_calls_are_a_failed_precondition(client):
    code, details = status_of(lambda: client.record_interactions("42", [("1", 4.0)]))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "--interactions-db none" in details
    assert status_of(lambda: client.forget_user("42"))[0] == grpc.StatusCode.FAILED_PRECONDITION
    assert client.model_info().interaction_store == ""


def test_the_cli_records_and_forgets(served, capsys):
    from recsys.client.__main__ import main as client_main

    client, _, _ = served
    target = client.target
    assert client_main(["record", "--target", target, "--user", "cli-user", "--interaction", "1:4", "--interaction",
                        "2"]) == 0
    assert "recorded 2 movies" in capsys.readouterr().out
    assert client_main(["forget", "--target", target, "--user", "cli-user"]) == 0
    assert "forgot 2 interactions" in capsys.readouterr().out


@pytest.mark.slow
def test_a_kill_right_after_an_ok_loses_nothing(models_dir, store_location):
    process, port = start_server_process(models_dir, "--interactions-db", store_location)
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
            for n in range(1, 21):
                assert client.record_interactions(f"user-{n}", [(str(n), 4.0), (str(n + 1), 0.0)]) == 2
            os.kill(process.pid, signal.SIGKILL)  # right after the last OK
        assert process.wait(timeout=10) == -signal.SIGKILL
    finally:
        stop_process(process)
    store = open_store(store_location)
    recorded = store.recent([f"user-{n}" for n in range(1, 21)], 10)
    assert len(recorded) == 20 and all(len(entries) == 2 for entries in recorded.values())
    store.close()


@pytest.mark.slow
def test_two_servers_on_one_postgres_share_what_is_recorded(models_dir, postgres):
    postgres.clear()
    # What one server records or erases reaches the other through the store's reads.
    budget = ("--store-read-ms", str(int(STORE_READ_SECONDS * 1000)))
    first, first_port = start_server_process(models_dir, "--interactions-db", postgres.url, *budget)
    second, second_port = start_server_process(models_dir, "--interactions-db", postgres.url, *budget)
    try:
        with RecommenderClient(f"127.0.0.1:{first_port}", timeout=10) as one, \
                RecommenderClient(f"127.0.0.1:{second_port}", timeout=10) as other:
            one.wait_until_serving(60)
            other.wait_until_serving(60)
            before = other.recommend("42", k=20)
            one.record_interactions("42", [(item.item_id, 5.0) for item in before[:3]])
            after = other.recommend("42", k=20)
            assert _ids(after) != _ids(before) and not set(_ids(before[:3])) & set(_ids(after))
            one.forget_user("42")
            erased = other.recommend("42", k=20)
            assert _ids(erased) == _ids(other.recommend("never-seen", k=20)), "served as an unknown id"
            assert all(item.fallback for item in erased)
    finally:
        stop_process(first)
        stop_process(second)


@pytest.mark.slow
def test_the_store_goes_down_and_comes_back(models_dir, postgres, caplog):
    postgres.clear()
    store = open_store(postgres.url)
    recommender, port = create_server("127.0.0.1:0", InProcessBackend(models_dir), models_dir,
                                      ServerOptions(poll_seconds=0.3, store_read_seconds=STORE_READ_SECONDS), store)
    recommender.start()
    caplog.set_level(logging.INFO, logger="recsys.requests")
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.wait_until_serving(60)
            client.record_interactions("42", [("1", 5.0)])
            with_store = client.recommend("42", k=10)
            postgres.stop()
            try:
                code, _ = status_of(lambda: client.record_interactions("42", [("2", 5.0)], timeout=3))
                assert code == grpc.StatusCode.UNAVAILABLE
                served = client.recommend("42", k=10, interactions=[("1", 5.0)])
                assert _ids(served) == _ids(with_store), "the request's own interactions still count"
                assert client.health() == "SERVING" and client.health("") == "SERVING"
                assert not any(item.fallback for item in client.recommend("42"))
            finally:
                postgres.start()
            wait_for(lambda: _records(client), 30, "the store to be back")
            assert {entry.item_id for entry in store.recent(["42"], 10)["42"]} == {"1", "2"}
            wait_for(lambda: recommender.metrics.registry.get_sample_value("recsys_store_errors_total") >= 1, 10,
                     "store errors counted")
        lines = [json.loads(record.getMessage()) for record in caplog.records if record.name == "recsys.requests"]
        assert any(line["method"] == "RecordInteractions" and line["status"] == "UNAVAILABLE" for line in lines)
    finally:
        recommender.stop(0).wait()
        store.close()


def _records(client) -> bool:
    try:
        return client.record_interactions("42", [("2", 5.0)], timeout=3) == 1
    except grpc.RpcError:
        return False


def test_a_broken_store_is_paused_then_retried(tmp_path, monkeypatch):
    import recsys.server.store

    monkeypatch.setattr(recsys.server.store, "RETRY_SECONDS", 0.2)
    path = tmp_path / "s.sqlite3"
    store = open_store(str(path))
    store.record("u", [Interaction("1", 4.0, 1)])
    store.close()
    break_sqlite(path)
    with pytest.raises(StoreUnavailable):
        store.recent(["u"], 5)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):  # paused: not even tried
        store.recent(["u"], 5)
    assert time.monotonic() - started < 0.05 and store.failures == 1
    mend_sqlite(path)
    wait_for(lambda: _reads(store), 5, "the store to be tried again")
    assert store.failures == 1


def _reads(store) -> bool:
    try:
        return bool(store.recent(["u"], 5))
    except StoreUnavailable:
        return False


def test_recommend_goes_on_without_the_store_and_counts_it(models_dir, tmp_path, served_backend):
    from recsys.server.pipeline import Pipeline
    from recsys.server.validation import Query

    path = tmp_path / "s.sqlite3"
    store = open_store(str(path))
    store.close()
    break_sqlite(path)
    pipeline = Pipeline(served_backend, CatalogStore(models_dir), store, 10)
    result = pipeline.recommend([Query("42", k=5), Query(NEW_USER, k=5, recent_interactions=(("1", 5.0),))])
    assert len(result[0].items) == 5 and not any(item.fallback for item in result[1].items)
    assert pipeline.store_reads_failed == 1 and store.failures == 1


def test_the_store_benchmark_loads_the_rows_it_says_and_reads_them(tmp_path, capsys):
    from recsys.server.store_bench import main as store_bench

    full, empty = tmp_path / "full.sqlite3", tmp_path / "empty.sqlite3"
    assert store_bench(["--store", str(full), "--empty-store", str(empty), "--users", "50", "--rows", "3000",
                        "--items", "400", "--reads", "40"]) == 0
    out = capsys.readouterr().out
    loaded = int(out.split(" rows of ")[0].split()[-1].replace(",", ""))
    store = open_store(str(full))
    try:
        assert sum(1 for _ in store.export()) == loaded
        newest = store.recent(["user-0"], 5)["user-0"]
        assert [entry.timestamp_seconds for entry in newest] == sorted((entry.timestamp_seconds for entry in newest),
                                                                        reverse=True)
    finally:
        store.close()
    assert out.count(" p99 ") == 4


def test_the_store_benchmark_loads_movielens_ids_and_can_stop_there(tmp_path, capsys):
    from recsys.server.store_bench import main as store_bench

    path = tmp_path / "full.sqlite3"
    assert store_bench(["--store", str(path), "--load-only", "--movielens-ids", "--users", "20", "--rows", "500",
                        "--items", "30"]) == 0
    out = capsys.readouterr().out
    assert " p99 " not in out, "no reads timed"
    store = open_store(str(path))
    try:
        movies = [row[1] for row in store.export()]
    finally:
        store.close()
    assert len(movies) == int(out.split(" rows of ")[0].split()[-1].replace(",", ""))
    assert set(movies) <= {str(movie) for movie in range(1, 31)} and {"1", "30"} <= set(movies)
    with pytest.raises(SystemExit):
        store_bench(["--store", str(tmp_path / "other.sqlite3")])

