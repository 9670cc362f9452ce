"""Request batching: concurrent requests share model calls and get exactly their own answers."""
import itertools
import threading
import time
from concurrent import futures

import pytest

from recsys.server.backend import Deadline
from recsys.server.batching import RequestBatcher
from recsys.server.catalog import CatalogStore
from recsys.server.errors import Cancelled, DeadlineExceeded
from recsys.server.in_process import InProcessBackend
from recsys.server.pipeline import Pipeline
from recsys.server.validation import Query


class CountingBackend(InProcessBackend):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_calls = 0
        self.gate = threading.Event()

    def retrieve_and_rank(self, *args, **kwargs):
        self.gate.wait(10)  # hold the first batch so the others queue up behind it
        self.model_calls += 1
        return super().retrieve_and_rank(*args, **kwargs)


@pytest.fixture()
def gated(models_dir):
    """A batcher over real models whose model calls wait for `backend.gate`."""
    backend, catalogs = CountingBackend(models_dir), CatalogStore(models_dir)
    assert backend.refresh(catalogs.get)
    pipeline = Pipeline(backend, catalogs)
    backend.batch_sizes = []
    batcher = RequestBatcher(pipeline, max_batch_size=32, backend_timeout=10, max_queued_queries=1000,
                             observe_batch=backend.batch_sizes.append)
    yield backend, pipeline, batcher
    backend.gate.set()
    batcher.close()


def test_concurrent_requests_are_merged_and_answered_individually(gated):
    backend, pipeline, batcher = gated
    users = [str(n) for n in range(1, 17)] + ["nobody"]
    with futures.ThreadPoolExecutor(len(users)) as pool:
        pending = [pool.submit(batcher.recommend, [Query(user, k=5)], Deadline(30)) for user in users]
        backend.gate.set()
        batched = [future.result()[0].items for future in pending]
    assert backend.model_calls < len(users)
    # One observation per batch, together covering every query; some batch merged several.
    assert sum(backend.batch_sizes) == len(users) and len(backend.batch_sizes) < len(users)
    for user, items in zip(users, batched):
        alone = pipeline.recommend([Query(user, k=5)])[0].items
        assert [item.item_id for item in items] == [item.item_id for item in alone]
        assert [item.score for item in items] == pytest.approx([item.score for item in alone], abs=1e-5)


def test_a_caller_past_its_deadline_gets_deadline_exceeded(gated):
    backend, _, batcher = gated
    with pytest.raises(DeadlineExceeded):
        batcher.recommend([Query("42")], Deadline(0.05))  # the gate holds retrieval longer than that
    backend.gate.set()
    assert len(batcher.recommend([Query("42")], Deadline(10))[0].items) == 10


def test_a_caller_that_went_away_costs_no_model_call(gated):
    backend, _, batcher = gated
    with futures.ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(batcher.recommend, [Query("1")], Deadline(30))  # holds the batcher at the gate
        gone = pool.submit(batcher.recommend, [Query("42")], Deadline(30, lambda: True))
        backend.gate.set()
        assert len(blocker.result()[0].items) == 10
        with pytest.raises(Cancelled):
            gone.result()
    assert backend.model_calls == 1


class ThreadRecordingBackend(InProcessBackend):
    """The real in-process backend, noting the thread that runs each model call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads: list[str] = []

    def retrieve_and_rank(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return super().retrieve_and_rank(*args, **kwargs)


def test_no_model_call_runs_on_the_event_loop(models_dir):
    from recsys.client import RecommenderClient
    from recsys.server.app import create_server
    from recsys.server.options import ServerOptions

    backend = ThreadRecordingBackend(models_dir)
    recommender, port = create_server("127.0.0.1:0", backend, models_dir,
                                      ServerOptions(poll_seconds=0.5))
    recommender.start()
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=30) as client:
            client.wait_until_serving(60)
            backend.threads.clear()
            client.recommend("42")
            # A lone call too: the loop (thread grpc-aio) must stay free for health checks and other calls.
            assert backend.threads == ["batcher-0"]

            users = [str(n) for n in range(1, 65)]
            backend.threads.clear()
            with futures.ThreadPoolExecutor(16) as pool:
                concurrent = list(pool.map(lambda user: [item.item_id for item in client.recommend(user)], users))
            assert set(backend.threads) == {"batcher-0"} and len(backend.threads) < len(users), "merged into batches"
            assert concurrent == [[item.item_id for item in client.recommend(user)] for user in users]
    finally:
        recommender.stop(0).wait()


def test_a_lone_recommend_is_not_queued_behind_large_batches(tmp_path):
    """Eight 100-user batches queued behind a running one: a one-user request arriving after them
    runs in the next model call, not after all of them (fake backend, held until all are queued)."""
    from tests.fake_backend import FakeBackend, write_fake_metadata

    models = write_fake_metadata(tmp_path / "models", movies=60)
    gate = threading.Event()  # holds the first batch until everything is queued
    backend = FakeBackend(models, delay=0.05, gate=gate)
    batcher = RequestBatcher(Pipeline(backend, CatalogStore(models), reasons=False), max_batch_size=32,
                             backend_timeout=10, max_queued_queries=5_000)
    try:
        sent = (("m3", 4.0),)  # users known only by what they send: each needs a model row
        large = [batcher.submit([Query(f"user-{n}-{u}", recent_interactions=sent) for u in range(100)]) for n in range(9)]
        lone = batcher.submit([Query("u1", k=5)])
        gate.set()
        assert len(lone.result(10)[0].items) == 5
        assert all(len(future.result(10)) == 100 for future in large)
        # Each model call (retrieve, then rank) records its users, in order: the lone user's first call is
        # the first or the second batch's retrieve (merged into whichever batch was taken next), not the tenth.
        ends = list(itertools.accumulate(backend.batch_sizes))
        calls = [backend.user_ids_seen[end - size:end] for end, size in zip(ends, backend.batch_sizes)]
        first_call = next(number for number, users in enumerate(calls) if "u1" in users)
        assert first_call <= 2, f"the lone request's first model call was call {first_call} of {len(calls)}"
    finally:
        batcher.close()


def test_one_deadline_carries_expiry_cancellation_and_timings():
    """What every layer is handed: a cap keeps the request's cancellation and timings."""
    went_away = threading.Event()
    deadline = Deadline(5, went_away.is_set)
    capped = deadline.capped(0.01)
    with capped.stage("models"):
        time.sleep(0.02)
    assert deadline.timings["models"] >= 0.02, "the capped call's time is the request's"
    with pytest.raises(DeadlineExceeded):
        capped.remaining()
    assert 4 < deadline.remaining() <= 5 and Deadline().remaining() is None
    went_away.set()
    with pytest.raises(Cancelled):
        deadline.remaining()
