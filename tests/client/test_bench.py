"""The load generator's output format and correctness (not speed: speed is a benchmark)."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import grpc
import pytest

from recsys.client.__main__ import main as client_main
from recsys.client.bench import UNKNOWN_USER_SHARE, ServerSampler, user_mix
from recsys.v1 import recommender_pb2, recommender_pb2_grpc
from tests.conftest import REPO_ROOT


def test_user_mix_is_mostly_known_users_with_a_few_unknown():
    mix = user_mix("all", None)
    unknown = sum(user.startswith("unknown-") for user in mix) / len(mix)
    assert 0.5 * UNKNOWN_USER_SHARE < unknown < 2 * UNKNOWN_USER_SHARE
    assert {user for user in mix if not user.startswith("unknown-")} <= {str(n) for n in range(1, 944)}
    assert {user for user in user_mix("5", None) if not user.startswith("unknown-")} <= {"1", "2", "3", "4", "5"}


def _check(summary, concurrency):
    assert summary["errors"] == {} and summary["ok"] == summary["requests"] > 10
    assert summary["concurrency"] == concurrency and summary["k"] == 10
    latency = summary["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert summary["throughput_rps"] > 0 and summary["client_cpu_percent_of_one_core"] > 0


def test_bench_against_the_server(running_server, models_dir, tmp_path, capsys):
    _, port = running_server
    out = tmp_path / "bench.json"
    # The server runs in this test process, so its memory is this process's.
    assert client_main(["bench", "--target", f"127.0.0.1:{port}", "--concurrency", "4", "--duration", "2",
                        "--models", str(models_dir), "--json", str(out), "--server-pid", str(os.getpid()),
                        "--rss-every", "0.5", "--wait", "30"]) == 0
    printed = capsys.readouterr().out
    for label in ("requests", "throughput", "req/s", "p50", "p90", "p99", "max", "load generator cpu", "server cpu",
                  "ms per request", "server rss MB"):
        assert label in printed
    summary = json.loads(out.read_text())
    _check(summary, 4)
    rss = summary["server_rss_mb"]
    assert len(rss["samples"]) >= 4 and rss["max"] == max(rss["samples"]) and rss["start"] > 100
    # Server and load generator share this process here, so the server's CPU includes the generator's,
    # up to /proc's clock ticks (one at each end of the run) and the figures' rounding.
    requests, tick_ms = summary["requests"], 1000 / os.sysconf("SC_CLK_TCK")
    server_ms = summary["server_cpu_ms_per_request"] * requests
    client_ms = summary["client_cpu_ms_per_request"] * requests
    assert client_ms > 0 and server_ms >= client_ms - 2 * tick_ms - 0.001 * requests
    assert summary["server_cpu_percent_of_one_core"] > 0.5 * summary["client_cpu_percent_of_one_core"] > 0


def test_server_sampler_counts_the_process_cpu_time():
    """/proc's CPU time for a process agrees with what the process itself measures."""
    with ServerSampler(os.getpid(), every_seconds=0.05) as sampler:
        before = time.process_time()
        while time.process_time() - before < 0.5:
            sum(range(1000))
        used = time.process_time() - before
    # Other threads of this process (gRPC, TensorFlow) may add a little; clock ticks are 10 ms.
    assert used - 0.03 <= sampler.cpu_seconds <= used + 0.25
    assert len(sampler.samples_mb) >= 3


def test_bench_wait_gives_up_on_a_server_that_never_serves(capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert client_main(["bench", "--target", f"127.0.0.1:{port}", "--duration", "1", "--wait", "1"]) == 1
    assert "was not SERVING within 1s" in capsys.readouterr().err


def test_bench_in_process(models_dir, tmp_path, capsys):
    from recsys.server.bench import main as server_bench_main

    out = tmp_path / "bench.json"
    assert server_bench_main(["--models", str(models_dir), "--duration", "1", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    _check(summary, 1)
    assert summary["target"].startswith("in-process")


def test_bench_in_process_takes_turns_between_exports(models_dir, tmp_path, capsys):
    from recsys.server.bench import main as server_bench_main

    out = tmp_path / "bench.json"
    assert server_bench_main(["--models", str(models_dir), str(models_dir), "--duration", "1",
                              "--json", str(out)]) == 0
    summaries = json.loads(out.read_text())
    assert [summary["models"] for summary in summaries] == [str(models_dir)] * 2
    for summary in summaries:
        _check(summary, 1)
    assert summaries[0]["ok"] == summaries[1]["ok"], "one call to each in turn"
    assert capsys.readouterr().out.count(f"== {models_dir}") == 2
    with pytest.raises(SystemExit):
        server_bench_main(["--models", str(models_dir), str(models_dir), "--model-call", "1"])


def test_bench_times_the_model_call_alone_by_batch_size(models_dir, capsys):
    from recsys.server.bench import main as server_bench_main

    assert server_bench_main(["--models", str(models_dir), "--model-call", "1,4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    found = [re.fullmatch(r"batch of +(\d+) users: with reasons +([\d.]+) ms a call, ([\d.]+) CPU ms a user; "
                          r"without +([\d.]+) ms a call, ([\d.]+) CPU ms a user", line) for line in lines]
    assert [int(match.group(1)) for match in found] == [1, 4]
    assert all(float(figure) > 0 for match in found for figure in match.groups()[1:])
    with pytest.raises(SystemExit):
        server_bench_main(["--models", str(models_dir), "--model-call", "many"])


@pytest.mark.parametrize("flags", [[], ["--aio"]])
def test_bench_against_the_transport_floor(tmp_path, flags):
    """server.floor answers the real contract with canned items: the bench's gRPC-only reference."""
    process = subprocess.Popen([sys.executable, "-m", "recsys.server.floor", "--port", "0", *flags], cwd=REPO_ROOT,
                               stderr=subprocess.PIPE, text=True)
    try:
        port = next(int(found.group(1)) for line in process.stderr
                    if (found := re.search(r"listening on port (\d+)", line)))
        out = tmp_path / "floor.json"
        assert client_main(["bench", "--target", f"127.0.0.1:{port}", "--concurrency", "2", "--duration", "1",
                            "--users", "20", "--json", str(out)]) == 0
        _check(json.loads(out.read_text()), 2)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            items = list(recommender_pb2_grpc.RecommenderStub(channel).Recommend(
                recommender_pb2.RecommendRequest(user_id="1", k=3), timeout=5))
        assert [item.rank for item in items] == [1, 2, 3]
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_percentiles_interpolate_as_numpy_does():
    import numpy as np

    from recsys.client.bench import percentile

    values = sorted(np.random.default_rng(0).exponential(size=101).tolist())
    for q in (0, 50, 90, 99, 100):
        assert abs(percentile(values, q) - float(np.percentile(values, q))) < 1e-12
    assert percentile([], 50) == 0.0


def test_a_bench_whose_requests_fail_says_so_and_exits_non_zero(tmp_path, capsys):
    from recsys.server.app import create_server
    from recsys.server.options import ServerOptions
    from tests.fake_backend import FakeBackend, write_fake_metadata

    models = write_fake_metadata(tmp_path / "models")
    # No call is ever admitted: every request fails RESOURCE_EXHAUSTED.
    server, port = create_server("127.0.0.1:0", FakeBackend(models), models,
                                 ServerOptions(poll_seconds=0.2, max_concurrent_rpcs=0))
    server.start()
    try:
        assert client_main(["bench", "--target", f"127.0.0.1:{port}", "--concurrency", "2", "--duration", "1",
                            "--users", "5"]) == 1
    finally:
        server.stop(0).wait(10)
    error = capsys.readouterr().err
    assert "requests failed" in error and "RESOURCE_EXHAUSTED" in error
