"""Stateless replicas behind client-side round_robin: both processes get traffic."""
import re
import socket
import urllib.request

import pytest

from recsys.client import RecommenderClient
from recsys.client.api import channel_target
from tests.conftest import start_server_process


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ok_recommends(metrics_port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    match = re.search(r'recsys_requests_total\{code="OK",method="Recommend"\} (\d+)', text)
    return int(match.group(1)) if match else 0


def test_channel_target_lists_several_addresses():
    assert channel_target("localhost:50051") == "localhost:50051"
    assert channel_target("10.0.0.1:1, 10.0.0.2:2") == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"


@pytest.mark.slow
def test_round_robin_spreads_calls_over_two_server_processes(models_dir):
    replicas = []
    try:
        for _ in range(2):
            metrics_port = _free_port()
            process, port = start_server_process(models_dir, "--metrics-port", str(metrics_port))
            replicas.append((process, port, metrics_port))
        target = ",".join(f"127.0.0.1:{port}" for _, port, _ in replicas)
        with RecommenderClient(target, timeout=10) as client:
            for _, port, _ in replicas:
                with RecommenderClient(f"127.0.0.1:{port}") as single:
                    single.wait_until_serving(90)
            for user in range(1, 41):
                assert len(client.recommend(str(user))) == 10
        counts = [_ok_recommends(metrics_port) for _, _, metrics_port in replicas]
        assert sum(counts) == 40 and min(counts) >= 10, counts
    finally:
        for process, _, _ in replicas:
            process.terminate()
            process.wait(timeout=30)
