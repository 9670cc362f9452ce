"""Hostile callers and failing stores, against the real stores (an SQLite file, a PostgreSQL server, one
of them frozen with SIGSTOP) and the fake backend: no caller or store can stall everyone."""
import asyncio
import contextlib
import socket
import sys
import time

import grpc
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest

from recsys.client import RecommenderClient
from recsys.server import app
from recsys.server import servicer as servicer_module
from recsys.server import store as store_module
from recsys.server.app import create_server
from recsys.server.catalog import CatalogStore
from recsys.server.errors import InvalidRequest, ModelsUnavailable, Overloaded
from recsys.server.options import ServerOptions
from recsys.server.pipeline import Pipeline
from recsys.server.sending import UnsentBytes
from recsys.server.store import open_store
from recsys.server.validation import Interaction, Query
from recsys.v1 import recommender_pb2
from tests.conftest import status_of, wait_for
from tests.fake_backend import FakeBackend, movie_ids, write_fake_metadata


def test_the_pipeline_on_the_fake_backend_leaves_out_what_the_user_rated_and_follows_what_they_sent(fake_models):
    backend = FakeBackend(fake_models)
    pipeline = Pipeline(backend, CatalogStore(fake_models), reasons=False)
    trained, fresh = pipeline.recommend([Query("u1", k=10), Query("new", k=3, recent_interactions=(("m30", 5.0),))])
    assert len(trained.items) == 10 and not {item.item_id for item in trained.items} & set(movie_ids(5))
    assert {item.item_id for item in fresh.items[:2]} == {"m29", "m31"}, "the sent movie's neighbours lead"
    assert backend.batch_sizes == [2, 2], "one retrieve and one rank call for the batch"


def test_a_user_keeps_at_most_the_newest_n_rows(store_location):
    store = open_store(store_location, max_per_user=25)
    try:
        for start in range(0, 100, 10):  # oldest first, ten a call
            store.record("heavy", [Interaction(f"m{n}", 4.0, 1_000 + n) for n in range(start, start + 10)])
        store.record("light", [Interaction("m1", 3.0, 5)])
        kept = store.recent(["heavy", "light"], 1_000)
        assert [entry.item_id for entry in kept["heavy"]] == [f"m{n}" for n in range(99, 74, -1)]
        assert kept["light"] == [Interaction("m1", 3.0, 5)], "other users keep theirs"
        assert sum(1 for row in store.export() if row[0] == "heavy") == 25
    finally:
        store.close()


def test_a_value_postgresql_cannot_hold_is_the_requests_fault_and_never_pauses_the_store(postgres):
    postgres.clear()
    store = open_store(postgres.url)
    try:
        with pytest.raises(InvalidRequest, match="cannot hold"):
            store.record("nul\x00user", [Interaction("m1", 4.0, 100)])
        assert store.failures == 0
        store.record("other", [Interaction("m2", 5.0, 100)])  # at once: no pause after a data error
        assert store.recent(["other"], 5)["other"] == [Interaction("m2", 5.0, 100)]
    finally:
        store.close()


def test_a_frozen_postgresql_costs_recommend_its_read_budget_and_no_more(fake_models, postgres):
    """SIGSTOP keeps the connections open and answers nothing, so statement_timeout never fires: each
    Recommend still answers within the read budget, with lists, and the store's rows come back after."""
    postgres.clear()
    store = open_store(postgres.url)
    store.record("u1", [Interaction("m40", 5.0, 100)])
    pipeline = Pipeline(FakeBackend(fake_models), CatalogStore(fake_models), store, reasons=False,
                        store_read_seconds=0.2)
    assert pipeline.recommend([Query("u1", k=5)])[0].stored_interactions == 1
    frozen = postgres.freeze()
    try:
        for _ in range(3):
            started = time.monotonic()
            result = pipeline.recommend([Query("u1", k=5), Query("nobody", k=5)])
            assert time.monotonic() - started < 1.0
            assert [len(answer.items) for answer in result] == [5, 5]
            assert result[0].stored_interactions == 0
        assert pipeline.store_reads_failed == 3 and store.read_timeouts >= 3
    finally:
        postgres.thaw(frozen)
    deadline = time.monotonic() + 30
    while pipeline.recommend([Query("u1", k=5)])[0].stored_interactions != 1:
        assert time.monotonic() < deadline, "the store's rows never came back"
        time.sleep(0.2)
    store.close()


# Timestamps as seconds after 1970, or (the last) seconds ahead of the clock when the test runs: a
# parameter read from the clock at collection would differ between pytest-xdist's workers.
@pytest.mark.parametrize("user_id, item_id, timestamp, ahead, field", [
    ("a\x00b", "m1", 100, False, "user_id"),
    ("u2", "m\x001", 100, False, "interactions[0].item_id"),
    ("u2", "m1", 2**63 - 1, False, "interactions[0].timestamp_seconds"),
    ("u2", "m1", 3_600, True, "interactions[0].timestamp_seconds"),
])
def test_what_a_store_cannot_hold_or_no_write_could_replace_is_invalid_at_the_edge(fake_server, user_id, item_id,
                                                                                    timestamp, ahead, field):
    client, store = fake_server
    timestamp += int(time.time()) if ahead else 0
    request = recommender_pb2.RecordInteractionsRequest(user_id=user_id, interactions=[
        recommender_pb2.Interaction(item_id=item_id, rating=4.0, timestamp_seconds=timestamp)])
    code, details = status_of(lambda: client.stub.RecordInteractions(request, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details
    assert not list(store.export()), "nothing was written"


def test_a_timestamp_within_the_allowed_skew_is_recorded(fake_server):
    client, store = fake_server
    soon = int(time.time()) + 60
    request = recommender_pb2.RecordInteractionsRequest(user_id="u2", interactions=[
        recommender_pb2.Interaction(item_id="m1", rating=4.0, timestamp_seconds=soon)])
    assert client.stub.RecordInteractions(request, timeout=10).recorded == 1
    assert store.recent(["u2"], 5)["u2"] == [Interaction("m1", 4.0, soon)]


class _HeldContext:
    """What the servicer asks of a grpc.aio context, for a call whose client reads nothing: every
    write waits (as grpc.aio's does on a flow-control window of 0)."""

    def __init__(self):
        self.callbacks = []
        self.written = []
        self.aborted = None

    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return 30.0

    def peer(self):
        return "ipv4:127.0.0.1:1"

    def add_done_callback(self, callback):
        self.callbacks.append(callback)

    async def write(self, message):
        self.written.append(message)
        await asyncio.Event().wait()

    async def abort(self, code, details):
        self.aborted = (code, details)
        raise AssertionError(f"aborted: {code} {details}")


def _fake_server(tmp_path, **options):
    models = write_fake_metadata(tmp_path / "models", movies=60)
    return create_server("127.0.0.1:0", FakeBackend(models), models, ServerOptions(poll_seconds=0.2, **options))


def test_streams_whose_clients_never_read_hold_no_admission_slot_and_are_cancelled_when_stalled(tmp_path):
    """Eight Recommend streams held at their first item against 4 slots: slots count calls at work,
    so none counts and a ninth call is admitted; --send-stall-seconds later each held stream is
    cancelled and counted."""
    server, _ = _fake_server(tmp_path, max_concurrent_rpcs=4, send_stall_seconds=1.0)
    servicer = server.servicer

    async def hold_streams():
        contexts, held = [], []
        for n in range(8):  # one after another: each is computed, then waits on its client
            contexts.append(_HeldContext())
            held.append(asyncio.ensure_future(
                servicer.Recommend(recommender_pb2.RecommendRequest(user_id=f"u{n}", k=10), contexts[-1])))
            while not contexts[-1].written:
                await asyncio.sleep(0.01)
        assert servicer.working == 0 and servicer.observer.active_calls == 8, "computed, now sending"
        ninth = _HeldContext()
        ninth.write = lambda message: asyncio.sleep(0, ninth.written.append(message))  # a client that reads
        await servicer.Recommend(recommender_pb2.RecommendRequest(user_id="u1", k=3), ninth)
        assert len(ninth.written) == 3, "a ninth call is admitted with four slots"
        outcomes = await asyncio.wait_for(asyncio.gather(*held, return_exceptions=True), 5)
        assert all(isinstance(outcome, asyncio.CancelledError) for outcome in outcomes)
        assert all(len(context.written) == 1 and context.aborted is None for context in contexts)

    try:
        server.loop_thread.run(hold_streams())
        assert servicer.observer.active_calls == 0
        assert server.metrics.stalled_streams._value.get() == 8
        assert server.metrics.requests.labels("Recommend", "CANCELLED")._value.get() == 8
    finally:
        server.stop(0).wait(10)


class _NonReadingConnection:
    """A raw HTTP/2 client connection whose streams have a receive window of 0: the server can send
    it headers and trailers (a status without messages), never a message."""

    def __init__(self, port: int):
        self.socket = socket.create_connection(("127.0.0.1", port))
        self.connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.connection.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        self.connection.initiate_connection()
        self.socket.sendall(self.connection.data_to_send())
        self.statuses: dict[int, str] = {}  # stream id: grpc-status, for streams that ended with one
        self.closed = False

    def call(self, method: str, request) -> int:
        stream_id = self.connection.get_next_available_stream_id()
        self.connection.send_headers(stream_id, [
            (":method", "POST"), (":scheme", "http"), (":path", f"/{app.SERVICE_NAME}/{method}"),
            (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers")])
        body = request.SerializeToString()
        self.connection.send_data(stream_id, b"\0" + len(body).to_bytes(4, "big") + body, end_stream=True)
        self.socket.sendall(self.connection.data_to_send())
        return stream_id

    def read(self, seconds: float) -> None:
        """Take in frames (answering pings, never opening a window) for `seconds` or until closed."""
        deadline = time.monotonic() + seconds
        while not self.closed and (left := deadline - time.monotonic()) > 0:
            self.socket.settimeout(left)
            try:
                data = self.socket.recv(65536)
            except (socket.timeout, ConnectionResetError):
                self.closed = not isinstance(sys.exc_info()[1], socket.timeout)
                continue
            self.closed = not data
            try:
                events = self.connection.receive_data(data)
            except h2.exceptions.ProtocolError:  # frames after the server's GOAWAY
                events = []
            for event in events:
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    status = dict(event.headers).get(b"grpc-status")
                    if status is not None:
                        self.statuses[event.stream_id] = status.decode()
            with contextlib.suppress(OSError):
                self.socket.sendall(self.connection.data_to_send())

    def close(self) -> None:
        self.socket.close()


def test_on_the_wire_a_stalled_stream_is_cancelled_and_its_connection_closed_at_its_maximum_age(tmp_path,
                                                                                                monkeypatch):
    monkeypatch.setattr(app, "CONNECTION_AGE_GRACE_SECONDS", 1)
    server, port = _fake_server(tmp_path, send_stall_seconds=0.5, max_connection_age_seconds=3)
    server.start()
    connection = _NonReadingConnection(port)
    try:
        wait_for(lambda: server.backend.is_ready(), 10, "the fake models")
        connection.call("Recommend", recommender_pb2.RecommendRequest(user_id="u1", k=10))
        connection.read(1.5)
        assert server.metrics.stalled_streams._value.get() == 1 and server.servicer.observer.active_calls == 0
        assert not connection.closed
        connection.read(6)
        assert connection.closed, "the connection went at its maximum age, and the unsent message with it"
    finally:
        connection.close()
        server.stop(0).wait(10)


def test_unread_batch_responses_are_held_against_their_connections_budget(tmp_path):
    """Unary responses wait whole in memory for their reader: beyond its connection's budget a call
    gets RESOURCE_EXHAUSTED (trailers need no window), other connections are served, and the
    bytes are released when the connection goes."""
    server, port = _fake_server(tmp_path)
    server.servicer.unsent = UnsentBytes(per_connection=20_000, total=1_000_000)
    server.start()
    batch = recommender_pb2.RecommendBatchRequest(
        requests=[recommender_pb2.RecommendRequest(user_id=f"u{n}", k=50) for n in range(4)])
    connection = _NonReadingConnection(port)
    try:
        wait_for(lambda: server.backend.is_ready(), 10, "the fake models")
        streams = [connection.call("RecommendBatch", batch) for _ in range(6)]
        connection.read(2)
        refused = [stream for stream in streams if connection.statuses.get(stream) == "8"]  # RESOURCE_EXHAUSTED
        held = server.servicer.unsent.total
        assert 1 <= len(refused) < len(streams) and 0 < held <= 20_000
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
            assert len(client.recommend_batch(["u1", "u2"], k=50)) == 2, "another connection is served"
        connection.close()
        wait_for(lambda: server.servicer.unsent.total == 0, 10, "the closed connection's bytes released")
    finally:
        connection.close()
        server.stop(0).wait(10)


def test_connections_beyond_the_limit_are_refused(tmp_path):
    server, port = _fake_server(tmp_path, max_connections=2)
    server.start()
    clients = [RecommenderClient(f"127.0.0.1:{port}", timeout=5, channel=grpc.insecure_channel(
        f"127.0.0.1:{port}", [("grpc.use_local_subchannel_pool", 1)])) for _ in range(3)]  # a connection each
    try:
        wait_for(lambda: server.backend.is_ready(), 10, "the fake models")
        assert [len(client.recommend("u1", k=2)) for client in clients[:2]] == [2, 2]
        assert status_of(lambda: clients[2].recommend("u1", k=2))[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        for client in clients:
            client.close()
        server.stop(0).wait(10)


def test_during_an_outage_retries_are_throttled_for_unary_and_streamed_calls(tmp_path):
    """A backend that answers UNAVAILABLE to everything: without throttling each call would be four
    attempts (64); the channel's retryThrottling and the client's stream budget stop retrying after
    about 20 failures."""
    models = write_fake_metadata(tmp_path / "models")
    backend = FakeBackend(models, fail_with=ModelsUnavailable("the models are down"))
    server, port = create_server("127.0.0.1:0", backend, models, ServerOptions(poll_seconds=0.2))
    server.start()
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
            calls = 16
            for _ in range(calls):
                assert status_of(lambda: client.recommend_batch(["u1"]))[0] == grpc.StatusCode.UNAVAILABLE
            unary_attempts = backend.calls
            assert calls <= unary_attempts <= calls + 20, unary_attempts
            for _ in range(calls):
                assert status_of(lambda: client.recommend("u1"))[0] == grpc.StatusCode.UNAVAILABLE
            assert calls <= backend.calls - unary_attempts <= calls + 20, backend.calls - unary_attempts
    finally:
        server.stop(0).wait(10)


def test_the_client_stamps_a_write_once_so_a_retry_keeps_the_first_time(fake_server):
    client, store = fake_server
    before = int(time.time())
    assert client.record_interactions("u5", [("m1", 4.0)]) == 1
    stamped = store.recent(["u5"], 5)["u5"][0].timestamp_seconds
    assert before <= stamped <= int(time.time())
    request = recommender_pb2.RecordInteractionsRequest(user_id="u5", interactions=[
        recommender_pb2.Interaction(item_id="m1", rating=2.0, timestamp_seconds=stamped - 50)])
    client.stub.RecordInteractions(request, timeout=10)  # an older retry of an earlier write changes nothing
    assert store.recent(["u5"], 5)["u5"] == [Interaction("m1", 4.0, stamped)]


def test_explaining_an_undecodable_request_is_bounded_work_on_the_event_loop():
    """4 MB of tiny fields ending in one invalid UTF-8 string: the decoder (which runs on the event
    loop) gives up naming the field instead of walking it all; a small bad request still names it."""
    from recsys.server.wire import tolerant_decoder

    decode = tolerant_decoder(recommender_pb2.RecommendBatchRequest)
    entry = recommender_pb2.RecommendRequest(user_id="u", exclude_item_ids=["m"] * 8).SerializeToString()
    field = b"\x0a" + bytes([len(entry)]) + entry
    bad = b"\x0a\x04\x0a\x02\xc3\x28"  # requests[n].user_id, not UTF-8
    for size, named in ((100, True), (4_000_000 // len(field), False)):
        started = time.perf_counter()
        result = decode(field * size + bad)
        assert time.perf_counter() - started < 0.2
        assert (f"requests[{size}].user_id is not valid UTF-8" in result.reason) == named, result.reason


def test_the_servers_budget_for_unread_responses_bounds_all_connections_together():
    unsent = UnsentBytes(per_connection=100, total=150)
    first, second = _HeldContext(), _HeldContext()
    second.peer = lambda: "ipv4:127.0.0.1:2"
    unsent.hold(first, 100)
    with pytest.raises(Overloaded, match="this connection"):
        unsent.hold(first, 1)
    with pytest.raises(Overloaded, match="the server holds its limit"):
        unsent.hold(second, 60)
    unsent.hold(second, 50)
    for callback in first.callbacks:
        callback(first)
    assert unsent.total == 50
    unsent.hold(second, 50)


def test_writes_to_a_frozen_postgresql_end_at_their_deadline_and_beyond_a_bound_fail_at_once(fake_models, postgres):
    """A frozen PostgreSQL answers no write and times none out: writes end at their caller's deadline (1.5 s:
    room for all 40 to arrive before the first ends, and less than the store's 2-s connect timeout),
    and once the store's threads and its queue are full, further writes get UNAVAILABLE at once
    rather than queue (each holding its request) for as long as the freeze lasts."""
    postgres.clear()
    store = open_store(postgres.url)
    server, port = create_server("127.0.0.1:0", FakeBackend(fake_models), fake_models,
                                 ServerOptions(poll_seconds=0.2), store=store)
    server.start()
    frozen = postgres.freeze()
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
            request = recommender_pb2.RecordInteractionsRequest(
                user_id="u1", interactions=[recommender_pb2.Interaction(item_id="m1", rating=4.0)])
            writes = [client.stub.RecordInteractions.future(request, timeout=1.5) for _ in range(40)]
            codes = [status_of(write.result)[0] for write in writes]
            assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}
            assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) == servicer_module.STORE_THREADS + \
                servicer_module.MAX_WAITING_STORE_CALLS
            refused = [message for code, message in map(status_of, [write.result for write in writes])
                       if code == grpc.StatusCode.UNAVAILABLE]
            assert all("not answering" in message for message in refused), refused
            # Later, UNAVAILABLE (the bound, the store's connect timeout or its pause after failures), well
            # before this call's own 10-s deadline.
            started = time.monotonic()
            assert status_of(lambda: client.stub.RecordInteractions(request, timeout=10.0))[0] == \
                grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() - started < store_module.CONNECT_TIMEOUT_SECONDS + 1.0
    finally:
        postgres.thaw(frozen)
        server.stop(0).wait(10)
        store.close()


def test_slow_similar_items_calls_queue_apart_from_everyone_elses_work(tmp_path):
    """Eight SimilarItems calls whose model calls take 0.5 s each: they wait on their own threads, so
    GetModelInfo (metadata read on the shared worker pool) still answers at once."""
    models = write_fake_metadata(tmp_path / "models", movies=60)
    server, port = create_server("127.0.0.1:0", FakeBackend(models, delay=0.5), models,
                                 ServerOptions(poll_seconds=0.2))
    server.start()
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=20) as client:
            client.wait_until_serving(10)
            request = recommender_pb2.SimilarItemsRequest(item_id="m10", k=3, user_id="u1")
            slow = [client.stub.SimilarItems(request, timeout=20) for _ in range(8)]
            time.sleep(0.2)  # all eight are in
            started = time.monotonic()
            assert client.stub.GetModelInfo(recommender_pb2.GetModelInfoRequest(), timeout=5).model_version == "1"
            assert time.monotonic() - started < 0.3
            assert all(len(list(call)) == 3 for call in slow)
    finally:
        server.stop(0).wait(10)
