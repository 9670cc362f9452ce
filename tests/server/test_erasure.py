"""ForgetUser is complete: a tombstone that late writes respect, nothing left in SQLite's file or WAL,
the served models stop using the user's trained history at once, and the next training leaves them out.
Against a real SQLite file and a real PostgreSQL server, and the fake backend."""
import time

from recsys.export.data import fit_and_held_out, load_csv
from recsys.export.stored import stored_ratings
from recsys.export.synth import generate, write
from recsys.server.catalog import CatalogStore
from recsys.server.pipeline import Pipeline
from recsys.server.store import open_store, user_hash
from recsys.server.validation import Interaction, Query
from tests.fake_backend import FakeBackend, write_fake_metadata


def test_a_tombstone_drops_late_writes_and_keeps_newer_ones(store_location):
    store = open_store(store_location)
    try:
        before = int(time.time()) - 100
        store.record("u", [Interaction("m1", 4.0, before), Interaction("m2", 3.0, before)])
        assert store.forget("u") == 2
        assert store.records(["u", "v"], 10).forgotten == {"u"}
        assert store.record("u", [Interaction("m1", 4.0, before)]) == 0, "a retry of the erased write re-creates nothing"
        assert store.recent(["u"], 10) == {}
        later = int(time.time()) + 5
        assert store.record("u", [Interaction("m3", 5.0, later), Interaction("m1", 2.0, before)]) == 1, \
            "a newer write is the user's own"
        assert store.recent(["u"], 10) == {"u": [Interaction("m3", 5.0, later)]}
        assert store.forgotten_hashes() == {user_hash("u")}
    finally:
        store.close()


def test_sqlite_keeps_no_trace_of_an_erased_id_in_its_file_or_wal(tmp_path):
    path = tmp_path / "interactions.sqlite3"
    store = open_store(str(path))
    secret = "erase-me-7f3a9c"
    store.record(secret, [Interaction(f"movie-{n}", 4.0, 1_000 + n) for n in range(200)])
    store.record("kept-user", [Interaction("movie-1", 3.0, 1_000)])
    store.forget(secret)
    wal = path.with_name(path.name + "-wal")
    on_disk = path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    try:
        assert secret.encode() not in on_disk, "the tombstone keeps a hash, and nothing else names the user"
        assert not wal.exists() or wal.stat().st_size == 0, "the WAL was checkpointed and truncated"
        assert store.recent(["kept-user"], 5)["kept-user"] == [Interaction("movie-1", 3.0, 1_000)]
    finally:
        store.close()


def test_an_erased_trained_user_is_served_as_an_unknown_id_at_once(tmp_path):
    models = write_fake_metadata(tmp_path / "models", movies=60)  # "u1" is a trained user
    store = open_store(str(tmp_path / "s.sqlite3"))
    backend = FakeBackend(models)
    pipeline = Pipeline(backend, CatalogStore(models), store, reasons=False, store_read_seconds=2.0)
    pipeline.recommend([Query("u1", k=5)])
    assert backend.user_ids_seen and set(backend.user_ids_seen) == {"u1"}
    store.forget("u1")
    backend.user_ids_seen.clear()
    cold = pipeline.recommend([Query("u1", k=5)])[0]
    assert not backend.user_ids_seen and all(item.fallback for item in cold.items), "nothing known: popularity"
    assert [item.item_id for item in cold.items] == [f"m{n}" for n in range(5)], "trained history not excluded"
    store.record("u1", [Interaction("m30", 5.0, 0)])
    fresh = pipeline.recommend([Query("u1", k=5)])[0]
    assert backend.user_ids_seen and set(backend.user_ids_seen) == {""}, "served from what they recorded since"
    assert fresh.stored_interactions == 1 and {item.item_id for item in fresh.items[:2]} == {"m29", "m31"}
    store.close()


def test_an_erasure_through_this_server_holds_while_the_store_cannot_be_read(tmp_path, postgres):
    """A frozen PostgreSQL answers no read within the budget: the user erased through this server is
    still served as an unknown id, the other trained user as before."""
    models = write_fake_metadata(tmp_path / "models", movies=60, rated={"u1": ["m0", "m1"], "u2": ["m2", "m3"]})
    postgres.clear()
    store = open_store(postgres.url)
    backend = FakeBackend(models)
    pipeline = Pipeline(backend, CatalogStore(models), store, reasons=False, store_read_seconds=0.2)
    store.forget("u1")
    frozen = postgres.freeze()
    try:
        backend.user_ids_seen.clear()
        erased, other = pipeline.recommend([Query("u1", k=5), Query("u2", k=5)])
        assert pipeline.store_reads_failed == 1, "the read ran out of its budget"
        assert all(item.fallback for item in erased.items) and not all(item.fallback for item in other.items)
        assert set(backend.user_ids_seen) == {"u2"}, "the erased user's trained history is not used"
    finally:
        postgres.thaw(frozen)
        store.close()


def test_the_next_training_leaves_erased_users_out(tmp_path):
    files = write(generate(40, 60, 1_200, seed=3), tmp_path / "csv", "csv")
    data = load_csv(files["ratings"], files["items"])
    erased = data.names.users[0]
    store_path = str(tmp_path / "s.sqlite3")
    store = open_store(store_path)
    store.record(str(erased), [Interaction(data.item_ids[0], 4.0, 0)])
    store.record("new-user", [Interaction(data.item_ids[1], 5.0, 0)])
    store.forget(str(erased))
    store.close()
    stored = stored_ratings(store_path, data)
    assert stored.forgotten == {erased}
    assert stored.rows.user_ids == ["new-user"]
    fit = fit_and_held_out(data.ratings, "test")[0]
    kept = stored.without_forgotten(fit, data.names)
    assert (fit[:, 0] == 0).any() and not (kept[:, 0] == 0).any()
    assert len(kept) == len(fit) - int((fit[:, 0] == 0).sum())


def test_erasure_applies_even_when_no_stored_interactions_are_merged(tmp_path):
    models = write_fake_metadata(tmp_path / "models", movies=60)
    store = open_store(str(tmp_path / "s.sqlite3"))
    backend = FakeBackend(models)
    pipeline = Pipeline(backend, CatalogStore(models), store, stored_interactions=0, reasons=False,
                        store_read_seconds=2.0)
    store.forget("u1")
    assert all(item.fallback for item in pipeline.recommend([Query("u1", k=5)])[0].items)
    assert not backend.user_ids_seen, "the models never saw the erased user's id"
    store.close()
