"""Operator promises: hot reload, drain, limits, TLS, auth, logs and metrics, over real channels."""
import datetime
import gc
import http.client
import ipaddress
import json
import logging
import os
import re
import signal
import ssl
import threading
import time
import urllib.error
import urllib.request
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.client import RecommenderClient
from recsys.server.app import create_server
from recsys.server.catalog import CatalogStore
from recsys.server.in_process import InProcessBackend
from recsys.server.observability import ThreadedLogWriter
from recsys.server.options import ServerOptions
from tests.conftest import publish, start_server_process, status_of, wait_for


def start(models, **options):
    options.setdefault("poll_seconds", 0.2)
    recommender, port = create_server("127.0.0.1:0", InProcessBackend(models, options.pop("model_version", None)),
                                      models, ServerOptions(**options))
    recommender.start()
    return recommender, port


class Traffic:
    """Continuous requests from a few threads until stopped; records every outcome."""

    def __init__(self, target, users=("1", "42", "405", "nobody")):
        self.client = RecommenderClient(target, timeout=10)
        self.users = users
        self.failures, self.versions, self.count = [], set(), 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(3)]

    def _run(self, n):
        while not self._stop.is_set():
            user = self.users[(self.count + n) % len(self.users)]
            try:
                items = self.client.recommend(user, k=10)
                versions = {item.model_version for item in items}
                if len(items) != 10 or len(versions) != 1:
                    self.failures.append(f"{user}: {len(items)} items, versions {versions}")
                self.versions |= versions
            except grpc.RpcError as error:
                self.failures.append(f"{user}: {error.code().name} {error.details()}")
            self.count += 1

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self.client.close()


@pytest.mark.slow
def test_soak_hot_swaps_and_a_broken_version_lose_no_request(models_dir, fresh_models):
    recommender, port = start(fresh_models)
    target = f"127.0.0.1:{port}"
    try:
        with RecommenderClient(target) as client:
            client.wait_until_serving(60)
            traffic = Traffic(target)
            with traffic:
                _swap_twice_with_a_broken_version_between(recommender, client, traffic, models_dir, fresh_models)
        assert traffic.failures == []
        assert {"1", "2", "4"} <= traffic.versions and "3" not in traffic.versions
        assert recommender.metrics.registry.get_sample_value("recsys_model_load_failures_total") == 1
        assert recommender.metrics.registry.get_sample_value("recsys_model_version") == 4
    finally:
        recommender.stop(0).wait()


def _swap_twice_with_a_broken_version_between(recommender, client, traffic, models_dir, fresh_models):
    wait_for(lambda: traffic.count > 20, what="traffic")
    publish(fresh_models, models_dir, 2)
    wait_for(lambda: client.model_info().model_version == "2", what="swap to version 2")
    publish(fresh_models, models_dir, 3, broken=True)
    wait_for(lambda: recommender.backend.load_failures == 1, what="broken version 3 to be rejected")
    assert client.model_info().model_version == "2"
    publish(fresh_models, models_dir, 4)
    wait_for(lambda: client.model_info().model_version == "4", what="swap to version 4")
    served_before = traffic.count
    wait_for(lambda: traffic.count > served_before + 20, what="traffic on version 4")


def test_a_version_is_served_with_its_catalog_loaded_and_the_heap_frozen(fresh_models):
    gc.unfreeze()
    recommender, port = start(fresh_models)
    try:
        with RecommenderClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(60)
            # Both done by the readiness check before health said SERVING, not in a request.
            assert list(recommender.servicer.pipeline.pipeline.catalogs._catalogs) == ["1"]
            assert gc.get_freeze_count() > 100_000, "the loaded models' objects are out of the collector's way"
    finally:
        recommender.stop(0).wait()


def test_catalogs_of_old_versions_are_dropped(models_dir, tmp_path):
    metadata = json.loads((models_dir / "metadata" / "1.json").read_text())
    (tmp_path / "metadata").mkdir()
    for version in range(1, 6):
        (tmp_path / "metadata" / f"{version}.json").write_text(json.dumps({**metadata, "model_version": version}))
    catalogs = CatalogStore(tmp_path)
    for version in "12345":
        assert catalogs.get(version).model_version == version
    assert list(catalogs._catalogs) == ["3", "4", "5"]
    catalogs.get("3")
    assert list(catalogs._catalogs) == ["4", "5", "3"], "least recently used goes first"
    assert catalogs.get("1").model_version == "1", "a dropped catalog reloads when asked for"
    assert list(catalogs._catalogs) == ["5", "3", "1"]


def test_pinned_version_is_served_even_when_newer_exist(models_dir, fresh_models):
    publish(fresh_models, models_dir, 2)
    recommender, port = start(fresh_models, model_version=1)
    try:
        with RecommenderClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(60)
            assert {item.model_version for item in client.recommend("42")} == {"1"}
    finally:
        recommender.stop(0).wait()


@pytest.mark.slow
def test_sigterm_drains_and_exits_within_grace(models_dir):
    process, port = start_server_process(models_dir, "--grace-seconds", "5", "--poll-seconds", "0.2")
    try:
        target = f"127.0.0.1:{port}"
        with RecommenderClient(target) as client:
            client.wait_until_serving(60)
            channel = grpc.insecure_channel(target)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            outcomes = []

            def call():
                try:
                    outcomes.append(len(client.recommend("42", k=100)))
                except grpc.RpcError as error:
                    outcomes.append((error.code(), error.details()))

            sigterm_sent = threading.Event()

            def calls():
                while not sigterm_sent.is_set():
                    call()

            # Calls in flight when SIGTERM arrives must complete. Daemon threads joined with a time
            # limit: a call that outlives its 5-s deadline fails the test instead of holding the run.
            callers = [threading.Thread(target=calls, daemon=True) for _ in range(8)]
            for caller in callers:
                caller.start()
            wait_for(lambda: len(outcomes) >= 16, 30, "calls to be answered")
            sigterm_sent.set()
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            for caller in callers:
                caller.join(timeout=max(0.0, started + 30 - time.monotonic()))
            assert not any(caller.is_alive() for caller in callers), "a call outlived its deadline"
            assert process.wait(timeout=15) == 0
            assert time.monotonic() - started < 5 + 3
            channel.close()
        assert any("TensorFlow threads: intra-op 1, inter-op 1 " in line for line in process.log_lines)
        # Request log lines are written by a thread of their own; none is lost at shutdown.
        process.log_drain.join(timeout=10)
        logged = [json.loads(line) for line in process.log_lines if line.startswith("{")]
        assert sum(line["method"] == "Recommend" and line["status"] == "OK" for line in logged) == outcomes.count(100)
        # With no other replica to retry on, a call the drain turned away ends UNAVAILABLE.
        assert [outcome for outcome in outcomes if outcome != 100 and outcome[0] != grpc.StatusCode.UNAVAILABLE] == []
        assert 100 in outcomes
    finally:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_tensorflow_thread_pools_are_sized_by_flags(models_dir):
    process, port = start_server_process(models_dir, "--tensorflow-intra-op-parallelism", "2",
                                         "--tensorflow-inter-op-parallelism", "0")
    try:
        # The sizes are read back from TensorFlow: set too late (after its first op), they would not hold.
        assert any("TensorFlow threads: intra-op 2, inter-op 0 " in line for line in process.log_lines)
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.wait_until_serving(60)
            assert len(client.recommend("42")) == 10
    finally:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_serving_goes_on_when_nobody_reads_the_log(models_dir):
    # 600 request lines are well over a pipe's 64 KiB buffer: written from the event loop,
    # they would block it, and every call after them would miss its deadline.
    process, port = start_server_process(models_dir, read_log=False)
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=5) as client:
            client.wait_until_serving(60)
            for n in range(600):
                assert len(client.recommend(str(1 + n % 943))) == 10
    finally:
        process.kill()
        process.wait()


def test_log_writer_drops_and_counts_what_a_stuck_stream_cannot_take():
    read_end, write_end = os.pipe()
    logger = logging.getLogger("recsys.test-stuck-stream")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    with os.fdopen(write_end, "w") as stream:
        writer = ThreadedLogWriter(logger, "%(message)s", stream=stream, max_queued=10)
        started = time.monotonic()
        for n in range(300):  # 300 KB of lines: the pipe holds 64 KiB, the queue 10 lines
            logger.info("%03d %s", n, "x" * 996)
        assert time.monotonic() - started < 2, "logging never waits for the stream"
        assert writer.dropped > 100
        started = time.monotonic()
        writer.stop(timeout=0.5)
        assert time.monotonic() - started < 2, "shutting down never hangs on a stuck stream"
        received = []
        reader = threading.Thread(target=lambda: received.extend(os.fdopen(read_end).read().splitlines()))
        reader.start()
        writer.stop(timeout=10)  # the stream moves again: what was queued is written
    reader.join(timeout=10)
    assert len(received) + writer.dropped == 300, "every line is either written whole or counted as dropped"
    assert [line[:3] for line in received] == sorted(line[:3] for line in received)


@pytest.mark.slow
def test_connections_are_recycled_without_failing_a_call(models_dir):
    recommender, port = start(models_dir, max_connection_age_seconds=0.5)
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.wait_until_serving(60)
            states = []
            client.channel.subscribe(states.append)
            # Calls go on until the connection was recycled twice (at most 20 s: a loaded machine
            # stretches the 0.5-s age and its grace).
            calls, stop_at = 0, time.monotonic() + 20
            while time.monotonic() < stop_at and (calls < 30 or states.count(grpc.ChannelConnectivity.READY) < 3):
                assert len(client.recommend(str(1 + calls % 943))) == 10
                calls += 1
            client.channel.unsubscribe(states.append)
            # The server closed the connection (GOAWAY) and the client connected again, unnoticed by the calls.
            assert states.count(grpc.ChannelConnectivity.READY) >= 3, states
    finally:
        recommender.stop(0).wait()


def test_concurrency_limit_rejects_overflow_and_recovers(models_dir):
    recommender, port = start(models_dir, max_concurrent_rpcs=1, max_workers=8)
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=30) as client:
            client.wait_until_serving(60)
            users = [str(u) for u in range(1, 101)]

            def call():
                try:
                    return len(client.recommend_batch(users, k=100))
                except grpc.RpcError as error:
                    return error.code()

            with futures.ThreadPoolExecutor(12) as pool:
                outcomes = list(pool.map(lambda _: call(), range(24)))
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes and 100 in outcomes
            assert set(outcomes) <= {100, grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert len(client.recommend("42")) == 10
    finally:
        recommender.stop(0).wait()


def test_oversized_request_is_resource_exhausted(models_dir):
    recommender, port = start(models_dir, max_request_bytes=64 * 1024)
    try:
        with RecommenderClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(60)
            huge = [f"movie-{n:08d}" for n in range(9_000)]
            code, _ = status_of(lambda: client.recommend("42", exclude=huge))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(client.recommend("42", exclude=huge[:100])) == 10
    finally:
        recommender.stop(0).wait()


def test_cancelled_stream_leaves_server_serving(client):
    stream = client.stream("42", k=100)
    next(stream)
    stream.cancel()
    with pytest.raises(grpc.RpcError) as error:
        list(stream)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    assert len(client.recommend("42")) == 10


def _self_signed_certificate():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def test_tls_and_bearer_token(models_dir, caplog):
    cert, key = _self_signed_certificate()
    token = "s3cret-token-never-logged"
    recommender, port = start(models_dir, tls_cert=cert, tls_key=key, auth_token=token)
    target = f"localhost:{port}"
    caplog.set_level(logging.DEBUG)
    try:
        with RecommenderClient(target, ca_cert=cert, token=token) as client:
            client.wait_until_serving(60)
            assert len(client.recommend("42")) == 10
        with RecommenderClient(target, ca_cert=cert) as anonymous:
            assert anonymous.health() == "SERVING", "health stays open for probes"
            code, details = status_of(lambda: anonymous.recommend("42"))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in details
        with RecommenderClient(target, ca_cert=cert, token="wrong") as impostor:
            assert status_of(lambda: impostor.recommend("42"))[0] == grpc.StatusCode.UNAUTHENTICATED
        with RecommenderClient(target, token=token) as plaintext:
            assert status_of(lambda: plaintext.recommend("42", timeout=3))[0] == grpc.StatusCode.UNAVAILABLE
        _the_http_face_serves_https_only(recommender, cert, token)
        assert token not in caplog.text
    finally:
        recommender.stop(0).wait()


def _the_http_face_serves_https_only(recommender, cert: bytes, token: str) -> None:
    """The same pair on the HTTP face: probes (open) and calls (with the token) over HTTPS only."""
    port = recommender.serve_http(0, "127.0.0.1")
    verified = ssl.create_default_context(cadata=cert.decode())
    for path in ("/v1/health", "/v1/health/live"):
        answer = urllib.request.urlopen(f"https://localhost:{port}{path}", timeout=5, context=verified)
        assert answer.status == 200 and json.load(answer) == {"status": "SERVING"}
    call = urllib.request.Request(f"https://localhost:{port}/v1/recommend", data=b'{"userId": "42", "k": 3}',
                                  headers={"Authorization": f"Bearer {token}"})
    lines = urllib.request.urlopen(call, timeout=10, context=verified).read().decode().splitlines()
    assert [json.loads(line)["rank"] for line in lines] == [1, 2, 3]
    with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
        urllib.request.urlopen(f"http://localhost:{port}/v1/health", timeout=5)


def test_one_structured_log_line_per_request(client, caplog):
    caplog.set_level(logging.INFO, logger="recsys.requests")
    client.recommend("42", k=7)
    client.recommend("someone-new", k=3)
    status_of(lambda: client.recommend("42", k=1000))
    lines = [json.loads(record.getMessage()) for record in caplog.records if record.name == "recsys.requests"]
    assert [(line["user_id"], line["status"], line["items"]) for line in lines] == [
        ("42", "OK", 7), ("someone-new", "OK", 3), ("42", "INVALID_ARGUMENT", 0)]
    assert lines[1]["fallback_items"] == 3
    assert all(len(line["request_id"]) >= 8 for line in lines)
    # In process both stages are one graph ("models"); "queue" is the wait for the batcher
    # thread, "stream" the sending of the items, both parts of "total".
    timings = lines[0]["ms"]
    assert {"total", "models", "queue", "stream"} <= set(timings)
    assert timings["models"] + timings["queue"] + timings["stream"] <= timings["total"] + 0.002  # rounding
    assert "models" not in lines[2]["ms"]  # rejected before any model ran
    assert lines[0]["model_version"] == "1"


@pytest.mark.parametrize("request_log, logged", [("errors", ["INVALID_ARGUMENT"]), ("none", [])])
def test_the_request_log_can_keep_errors_only_or_nothing_and_metrics_count_all(fake_models, caplog, request_log,
                                                                                logged):
    from tests.fake_backend import FakeBackend

    recommender, port = create_server("127.0.0.1:0", FakeBackend(fake_models), fake_models,
                                      ServerOptions(poll_seconds=0.2, request_log=request_log))
    recommender.start()
    caplog.set_level(logging.INFO, logger="recsys.requests")
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as client:
            client.wait_until_serving(10)
            assert len(client.recommend("u1", k=3)) == 3
            assert status_of(lambda: client.recommend("u1", k=1000))[0] == grpc.StatusCode.INVALID_ARGUMENT
        lines = [json.loads(record.getMessage()) for record in caplog.records if record.name == "recsys.requests"]
        assert [line["status"] for line in lines] == logged
        counted = recommender.metrics.registry.get_sample_value
        assert counted("recsys_requests_total", {"method": "Recommend", "code": "OK"}) == 1
        assert counted("recsys_requests_total", {"method": "Recommend", "code": "INVALID_ARGUMENT"}) == 1
    finally:
        recommender.stop(0).wait(10)


def test_prometheus_metrics(running_server, client):
    recommender, _ = running_server
    metrics_port = recommender.serve_metrics(0, host="127.0.0.1")

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()

    def value(text: str, sample: str) -> float:
        match = re.search(re.escape(sample) + r" ([0-9.e+]+)", text)
        return float(match.group(1)) if match else 0.0

    ok = 'recsys_requests_total{code="OK",method="Recommend"}'
    invalid = 'recsys_requests_total{code="INVALID_ARGUMENT",method="Recommend"}'
    before = scrape()
    client.recommend("42")
    client.recommend("brand-new-user", k=4)
    status_of(lambda: client.recommend(""))
    after = scrape()
    assert value(after, ok) - value(before, ok) == 2
    assert value(after, invalid) - value(before, invalid) == 1
    assert value(after, "recsys_fallback_items_total") - value(before, "recsys_fallback_items_total") == 4
    # Two valid calls, one after the other: two batches of one query each.
    assert value(after, "recsys_batch_queries_count") - value(before, "recsys_batch_queries_count") == 2
    assert value(after, "recsys_batch_queries_sum") - value(before, "recsys_batch_queries_sum") == 2
    for stage in ("models", "queue", "stream", "total"):
        assert f'recsys_stage_latency_seconds_bucket{{le="0.005",stage="{stage}"}}' in after
    assert value(after, "recsys_model_version") == 1
    assert value(after, "recsys_model_load_failures_total") == 0
