"""Fault injection: hostile requests, broken versions, a TF Serving that stalls or fails, overload and
shutdown, each against the real server, the real client and real SavedModels (the TF Serving
stand-in where TF Serving is involved)."""
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import recsys.server.in_process
from recsys.client import RecommenderClient
from recsys.server.app import create_server
from recsys.server.backend import Deadline, UserBatch
from recsys.server.in_process import InProcessBackend
from recsys.server.limits import MAX_EXCLUDED_ITEMS, MAX_ITEM_ID_LENGTH
from recsys.server.options import ServerOptions
from recsys.v1 import recommender_pb2
from tests.conftest import REPO_ROOT, publish, start_server_process, start_tf_serving, status_of, stop_process, wait_for
from tests.server.test_production import start

RECOMMEND = "/recsys.v1.Recommender/Recommend"


def _raw_call(port: int, method: str, payload: bytes, streaming: bool):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = (channel.unary_stream if streaming else channel.unary_unary)(
            method, request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
        response = call(payload, timeout=10)
        return list(response) if streaming else response


@pytest.mark.parametrize("method, streaming, payload, field", [
    (RECOMMEND, True, b"\x0a\x02\xc3\x28", "user_id is not valid UTF-8"),
    (RECOMMEND, True, b"\x0a\x0242\x1a\x011\x1a\x02\xff\xfe", "exclude_item_ids[1] is not valid UTF-8"),
    ("/recsys.v1.Recommender/RecommendBatch", False, b"\x0a\x04\x0a\x0242\x0a\x04\x0a\x02\xed\xa0",
     r"requests[1].user_id is not valid UTF-8"),
    ("/recsys.v1.Recommender/GetModelInfo", False, b"\x0a\xff", "not a valid recsys.v1.GetModelInfoRequest"),
    (RECOMMEND, True, b"\x0a\x10ab", "not a valid recsys.v1.RecommendRequest"),
])
def test_undecodable_requests_are_invalid_argument_naming_the_field(running_server, method, streaming, payload, field):
    recommender, port = running_server
    labels = {"method": method.rsplit("/", 1)[1], "code": "INVALID_ARGUMENT"}

    def counted() -> float:
        return recommender.metrics.registry.get_sample_value("recsys_requests_total", labels) or 0.0

    before = counted()
    code, details = status_of(lambda: _raw_call(port, method, payload, streaming))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details
    assert counted() == before + 1, "counted through the one error map"


def test_item_ids_have_a_length_limit_and_batches_a_total(client):
    too_long = ["1", "2", "3", "x" * (MAX_ITEM_ID_LENGTH + 1)]
    code, details = status_of(lambda: client.recommend("42", exclude=too_long))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "exclude_item_ids[3] is 129 characters" in details
    per_entry = [str(n) for n in range(MAX_EXCLUDED_ITEMS // 2 + 1)]
    code, details = status_of(lambda: client.recommend_batch(["42", "7"], exclude=per_entry))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "the maximum over a batch is 10000" in details
    assert [item.item_id for item in client.recommend("ß-user", exclude=["é", "ñ", "😀"])], "non-ASCII ids are fine"


def _peak_rss_mb() -> float:
    for line in open(f"/proc/{os.getpid()}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_request_of_the_maximum_size_costs_bounded_memory(running_server, client):
    """The server runs in this process: its peak RSS over max-size requests of every shape."""
    with open(f"/proc/{os.getpid()}/clear_refs", "w") as refs:
        refs.write("5")  # resets the peak (VmHWM) to the current RSS
    before = _peak_rss_mb()
    longest = [f"{n:0{MAX_ITEM_ID_LENGTH}d}" for n in range(MAX_EXCLUDED_ITEMS)]
    shortest = [str(n) for n in range(MAX_EXCLUDED_ITEMS)]
    with futures.ThreadPoolExecutor(8) as pool:
        calls = [pool.submit(client.recommend, "42", 100, exclusions) for exclusions in (longest, shortest) * 8]
        calls += [pool.submit(client.recommend_batch, [str(n) for n in range(1, 101)], 100, longest[:100])
                  for _ in range(8)]
        results = [call.result() for call in calls]
    assert results[0] and results[1] == [], "the short ids exclude every movie of the catalog"
    growth = _peak_rss_mb() - before
    assert growth < 150, f"peak RSS grew {growth:.0f} MB over 16 max-size Recommend and 8 RecommendBatch calls"


@pytest.mark.slow
def test_health_answers_quickly_while_the_largest_batch_runs(models_dir):
    """Against a server process of its own, as deployed (its heap is not the test runner's)."""
    process, port = start_server_process(models_dir)
    client = RecommenderClient(f"127.0.0.1:{port}", timeout=30)
    client.wait_until_serving(60)
    request = recommender_pb2.RecommendBatchRequest(requests=[
        recommender_pb2.RecommendRequest(user_id=str(n), k=100,
                                         exclude_item_ids=[f"{n}-{m:0120d}" for m in range(MAX_EXCLUDED_ITEMS // 100)])
        for n in range(1, 101)])
    assert request.ByteSize() > 1_000_000
    latencies = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with futures.ThreadPoolExecutor(4) as pool:
            begun = time.perf_counter()
            batches = [pool.submit(client.stub.RecommendBatch, request, timeout=30) for _ in range(3)]
            while not all(batch.done() for batch in batches):
                started = time.perf_counter()
                health.Check(health_pb2.HealthCheckRequest(service="recsys.v1.Recommender"), timeout=5)
                latencies.append(time.perf_counter() - started)
            batch_seconds = time.perf_counter() - begun
            assert all(len(batch.result().results) == 100 for batch in batches)
    client.close()
    stop_process(process)
    # Both processes share 2 cores with the batches' threads: a check may wait for a CPU, never for a batch.
    assert len(latencies) >= 3, f"the batches took {batch_seconds:.2f} s: too short to check anything"
    assert statistics.median(latencies) < 0.05 and max(latencies) < min(0.25, batch_seconds / 4), \
        f"health took {statistics.median(latencies) * 1000:.0f} ms (median), up to {max(latencies) * 1000:.0f} ms " \
        f"while the batches took {batch_seconds:.2f} s"


class GatedBackend(InProcessBackend):
    """Real models whose model calls wait for `gate`: work stays in flight as long as a test wants."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()

    def retrieve_and_rank(self, *args, **kwargs):
        self.gate.wait(30)
        return super().retrieve_and_rank(*args, **kwargs)


def test_admission_control_refuses_at_once_and_health_never_counts(models_dir):
    backend = GatedBackend(models_dir)
    recommender, port = create_server("127.0.0.1:0", backend, models_dir,
                                      ServerOptions(poll_seconds=0.2, max_concurrent_rpcs=3, max_queued_queries=150))
    recommender.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=30) as client:
            client.wait_until_serving(60)
            watches = [health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
                       for _ in range(5)]
            assert all(next(watch).status == health_pb2.HealthCheckResponse.SERVING for watch in watches)
            with futures.ThreadPoolExecutor(4) as pool:
                held = [pool.submit(client.recommend_batch, [str(n) for n in range(1, 101)]),
                        pool.submit(client.recommend, "42"), pool.submit(client.recommend, "1")]
                wait_for(lambda: recommender.servicer.observer.active_calls == 3, 10, "three calls in flight")
                started = time.monotonic()
                code, details = status_of(lambda: client.recommend("7"))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit of 3 calls" in details
                assert time.monotonic() - started < 1, "refused at once, not queued"
                assert client.health() == "SERVING", "probes are never refused"
                backend.gate.set()
                assert [len(call.result()) for call in held] == [100, 10, 10]
            backend.gate.clear()
            with futures.ThreadPoolExecutor(2) as pool:
                first = pool.submit(client.recommend_batch, [str(n) for n in range(1, 101)])
                wait_for(lambda: recommender.servicer.observer.active_calls == 1, 10, "a batch in flight")
                time.sleep(0.2)  # the first batch is taken; a second one now queues behind it
                second = pool.submit(client.recommend_batch, [str(n) for n in range(1, 101)])
                wait_for(lambda: recommender.servicer.observer.active_calls == 2, 10, "a second batch queued")
                time.sleep(0.2)
                code, details = status_of(lambda: client.recommend_batch([str(n) for n in range(1, 60)]))
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "waiting for the models" in details
                backend.gate.set()
                assert len(first.result()) == len(second.result()) == 100
    finally:
        backend.gate.set()
        channel.close()
        recommender.stop(0).wait()


@pytest.mark.parametrize("damage, why", [
    (lambda raw: "{" + json.dumps(raw)[:1000], "cannot be read"),
    (lambda raw: json.dumps({**raw, "candidate_count": "many"}), "candidate_count"),
    (lambda raw: json.dumps({**raw, "popular_item_ids": ["no-such-movie"]}), "popular_item_ids"),
    (lambda raw: json.dumps({**raw, "items": dict(list(raw["items"].items())[1:])}), "missing from"),
    (lambda raw: json.dumps({**raw, "serves_interactions": "yes"}), "serves_interactions"),
    (lambda raw: json.dumps({**raw, "indexes": []}), "indexes must be an object"),
    (lambda raw: json.dumps({**raw, "indexes": {"retrieval": {"kind": "scann"}}}), "brute_force or partitioned"),
    (lambda raw: json.dumps({**raw, "indexes": {"retrieval": {"kind": "partitioned", "probes": -1}}}), "numbers"),
])
def test_metadata_is_checked_field_by_field(fresh_models, damage, why):
    from recsys.server.catalog import InvalidMetadata, load_catalog

    path = fresh_models / "metadata" / "1.json"
    path.write_text(damage(json.loads(path.read_text())))
    with pytest.raises(InvalidMetadata, match=why):
        load_catalog(fresh_models, 1)


def test_a_refresh_reads_metadata_mended_in_place_and_requests_keep_what_they_read(fresh_models):
    """Requests never pay a stat for the catalog; the backend's refresh sees a file changed since."""
    from recsys.server.catalog import CatalogStore

    catalogs = CatalogStore(fresh_models)
    first = catalogs.get("1")
    path = fresh_models / "metadata" / "1.json"
    # A longer file: a change is seen by its size too, where the clock's tick is coarser than the test.
    path.write_text(json.dumps({**json.loads(path.read_text()), "candidate_count": first.candidate_count + 1000}))
    assert catalogs.get("1") is first
    mended = catalogs.refreshed("1")
    assert mended.candidate_count == first.candidate_count + 1000
    assert catalogs.get("1") is mended and catalogs.refreshed("1") is mended, "unchanged since: no read"


# A server per kind of damage: metadata that does not parse (refused before the graphs load) and
# metadata that disagrees with the graphs (refused once they have). Slow; the fast tier checks every
# field on its own above.
@pytest.mark.slow
@pytest.mark.parametrize("damage, why", [
    (lambda path: path.write_text(path.read_text()[:1000]), "truncated"),
    pytest.param(lambda path: path.write_text(json.dumps({
        **(raw := json.loads(path.read_text())), "items": dict(list(raw["items"].items())[1:]),
        "popular_item_ids": [item for item in raw["popular_item_ids"] if item != next(iter(raw["items"]))]})),
        "missing from"),
])
def test_a_version_with_bad_metadata_never_displaces_the_good_one(models_dir, fresh_models, monkeypatch, damage, why):
    monkeypatch.setattr(recsys.server.in_process, "RETRY_SECONDS", 0.4)
    loaded_versions = []
    load_pair = recsys.server.in_process.load_pair
    monkeypatch.setattr(recsys.server.in_process, "load_pair",
                        lambda models, version, *args: loaded_versions.append(version) or load_pair(models, version, *args))
    recommender, port = start(fresh_models)
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.wait_until_serving(60)
            publish(fresh_models, models_dir, 2)
            metadata = fresh_models / "metadata" / "2.json"
            good = metadata.read_text()
            damage(metadata)
            wait_for(lambda: recommender.backend.load_failures >= 2, 30, "version 2 refused, then tried again")
            # Metadata that does not parse is refused before the graphs load, at every retry.
            assert loaded_versions.count(2) == 0 if why == "truncated" else loaded_versions.count(2) >= 2
            assert {item.model_version for item in client.recommend("42")} == {"1"}
            assert client.health() == "SERVING"
            metadata.write_text(good)  # e.g. the copy finished: the retry picks it up
            wait_for(lambda: {item.model_version for item in client.recommend("42")} == {"2"}, 30, "version 2")
    finally:
        recommender.stop(0).wait()


@pytest.mark.slow
def test_the_swapped_out_pair_is_released(models_dir, fresh_models):
    import gc
    import weakref

    recommender, port = start(fresh_models)
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.wait_until_serving(60)
            old = weakref.ref(recommender.backend.current.saved_models[0])
            publish(fresh_models, models_dir, 2)
            wait_for(lambda: recommender.monitor._settled_version == "2", 30, "version 2 swapped in and settled")
            client.recommend("42")

            def released() -> bool:
                gc.collect()
                return old() is None

            wait_for(released, 10, "version 1's SavedModel to be released")
    finally:
        recommender.stop(0).wait()


@pytest.fixture()
def stalled_tf_serving(models_dir):
    """The stand-in, then stopped (SIGSTOP): it accepts connections and never answers."""
    process, port = start_tf_serving(models_dir / "models.config")
    yield process, port
    os.kill(process.pid, signal.SIGCONT)
    stop_process(process)


@pytest.mark.slow
def test_a_stalled_tf_serving_costs_each_call_at_most_the_cap(models_dir, stalled_tf_serving):
    from recsys.server.tf_serving import TFServingBackend

    process, tf_port = stalled_tf_serving
    recommender, port = create_server("127.0.0.1:0", TFServingBackend(f"127.0.0.1:{tf_port}", models_dir), models_dir,
                                      ServerOptions(poll_seconds=0.2, backend_timeout_seconds=1.0))
    recommender.start()
    try:
        client = RecommenderClient(f"127.0.0.1:{port}", timeout=30)
        client.wait_until_serving(60)
        os.kill(process.pid, signal.SIGSTOP)
        no_deadline = client.stub.Recommend  # a caller that sets no deadline at all
        started = time.monotonic()
        with futures.ThreadPoolExecutor(4) as pool:
            stuck = pool.submit(lambda: status_of(lambda: list(no_deadline(recommender_pb2.RecommendRequest(
                user_id="42")))))
            others = [pool.submit(lambda: status_of(lambda: client.recommend("7", timeout=5))) for _ in range(3)]
            outcomes = [stuck.result(timeout=10)] + [other.result(timeout=10) for other in others]
        assert time.monotonic() - started < 4, "every call ended within the 1 s cap (plus the retry policy's)"
        assert {code for code, _ in outcomes} <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE}
        assert all(f":{tf_port}" not in details for _, details in outcomes), "TF Serving's address stays in the log"
        os.kill(process.pid, signal.SIGCONT)
        wait_for(lambda: client.health() == "SERVING", 30, "ready again")
        assert len(client.recommend("42")) == 10
        client.close()
    finally:
        recommender.stop(0).wait()


@pytest.mark.slow
def test_a_failed_tf_serving_call_fails_that_call_only(models_dir):
    from recsys.server.catalog import CatalogStore
    from recsys.server.errors import ModelsUnavailable
    from recsys.server.tf_serving import TFServingBackend

    process, tf_port = start_tf_serving(models_dir / "models.config")
    try:
        backend = TFServingBackend(f"127.0.0.1:{tf_port}", models_dir)
        assert backend.refresh(CatalogStore(models_dir).get) and backend.is_ready()
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            dead = closed.getsockname()[1]
        real_stub = backend.stub
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{dead}") as channel:  # a real connection refused
            backend.stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            with pytest.raises(ModelsUnavailable, match="retry"):
                backend.retrieve(UserBatch.of(["42"]), include_rated=False, deadline=Deadline(2))
        backend.stub = real_stub
        assert backend.is_ready(), "one failed call does not mark the replica down"
        assert backend.retrieve(UserBatch.of(["42"]), include_rated=False, deadline=Deadline(5)).item_ids.shape[0] == 1
        backend.close()
    finally:
        stop_process(process)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", ["32", "1"])
def test_shutdown_with_a_stuck_backend_call_exits_within_the_grace_and_says_so(models_dir, stalled_tf_serving,
                                                                               batch_size):
    process, tf_port = stalled_tf_serving
    server_process, port = start_server_process(models_dir, "--tf-serving", f"127.0.0.1:{tf_port}", "--grace-seconds",
                                                "1", "--backend-timeout-seconds", "60", "--max-batch-size", batch_size,
                                                "--poll-seconds", "0.2")
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=60) as client:
            client.wait_until_serving(60)
            os.kill(process.pid, signal.SIGSTOP)
            # A call the stalled TF Serving never answers (the server's cap is 60 s).
            threading.Thread(target=lambda: status_of(lambda: client.recommend("42", timeout=5)), daemon=True).start()
            time.sleep(0.5)
            started = time.monotonic()
            server_process.send_signal(signal.SIGTERM)
            code = server_process.wait(timeout=10)
            took = time.monotonic() - started
        assert took < 1 + 1, f"exited after {took:.1f} s with a 1 s grace"
        assert code == 1, "a forced shutdown exits non-zero"
        assert any("shutdown forced" in line for line in server_process.log_lines)
    finally:
        server_process.kill()
        server_process.wait()


@pytest.mark.slow
def test_a_rolling_restart_fails_no_call(models_dir):
    """Two replicas; one drains (SIGTERM: GOAWAY, in-flight calls finish) while calls keep coming:
    the client's retry policy sends what raced the drain to the other replica."""
    first, first_port = start_server_process(models_dir, "--grace-seconds", "3", "--poll-seconds", "0.2")
    second, second_port = start_server_process(models_dir, "--grace-seconds", "3", "--poll-seconds", "0.2")
    failures, served = [], []
    stop = threading.Event()
    try:
        with RecommenderClient(f"127.0.0.1:{first_port},127.0.0.1:{second_port}", timeout=10) as client:
            for port in (first_port, second_port):
                with RecommenderClient(f"127.0.0.1:{port}") as one:
                    one.wait_until_serving(60)

            def traffic():
                while not stop.is_set():
                    try:
                        served.append(len(client.recommend("42")))
                    except grpc.RpcError as error:
                        failures.append((error.code(), error.details()))

            threads = [threading.Thread(target=traffic) for _ in range(4)]
            for thread in threads:
                thread.start()
            time.sleep(1)
            first.send_signal(signal.SIGTERM)
            assert first.wait(timeout=10) == 0
            time.sleep(1)
            stop.set()
            for thread in threads:
                thread.join()
        assert failures == [] and len(served) > 50
    finally:
        stop.set()
        for process in (first, second):
            process.kill()
            process.wait()


def _code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("call", ["no retries", "recommend", "recommend_batch", "similar"])
def test_calls_a_stopping_replica_never_handled_are_retried_on_another(models_dir, call):
    """gRPC's server answers CANCELLED for the calls that reached it but that no handler had taken
    when it stops (grpc/grpc#41785). Here the first replica's event loop is held while calls arrive,
    then that replica stops: without retries they fail CANCELLED; RecommenderClient retries every
    one on the second replica."""
    replicas = [start(models_dir), start(models_dir)]
    target = ",".join(f"127.0.0.1:{port}" for _, port in replicas)
    first = replicas[0][0]
    if call == "no retries":
        client = RecommenderClient(target, channel=grpc.insecure_channel(
            "ipv4:" + target, [("grpc.lb_policy_name", "round_robin")]))
        request = recommender_pb2.RecommendRequest(user_id="42")
        send = lambda: list(client.stub.Recommend(request, timeout=10))  # noqa: E731
    else:
        client = RecommenderClient(target, timeout=10)
        send = {"recommend": lambda: client.recommend("42"), "recommend_batch": lambda: client.recommend_batch(["42"]),
                "similar": lambda: client.similar("1")}[call]
    try:
        for port in (port for _, port in replicas):
            with RecommenderClient(f"127.0.0.1:{port}") as one:
                one.wait_until_serving(60)
        for _ in range(20):  # both replicas connected
            send()

        def hold_then_stop():
            time.sleep(1.0)  # the calls reach the replica; its loop hands none to a handler
            first.servicer.accepting = False
            asyncio.ensure_future(first.grpc_server.stop(3))

        first.loop_thread.loop.call_soon_threadsafe(hold_then_stop)
        time.sleep(0.1)
        with futures.ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(lambda _: _code_of(send), range(16)))
        if call == "no retries":
            assert grpc.StatusCode.CANCELLED in outcomes, "the scenario no longer makes gRPC cancel calls"
        else:
            assert outcomes == [grpc.StatusCode.OK] * 16
    finally:
        client.close()
        for recommender, _ in replicas:
            recommender.stop(0).wait()


@pytest.mark.slow
def test_startup_failure_exits_non_zero_and_metrics_bind_the_grpc_host(models_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        failed = subprocess.run([sys.executable, "-m", "recsys.server", "--models", str(models_dir), "--host", "127.0.0.1",
                                 "--port", str(port)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "could not start" in failed.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    token = tmp_path / "token"
    token.write_text("secret")
    process, _ = start_server_process(models_dir, "--metrics-port", str(metrics_port), "--auth-token-file", str(token))
    try:
        assert b"recsys_requests" in urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                                            timeout=10).read()
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.2:{metrics_port}/metrics", timeout=3)
        assert any("over plaintext" in line for line in process.log_lines)
    finally:
        stop_process(process)
