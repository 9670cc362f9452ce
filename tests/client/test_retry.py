"""RetriedStream on a real channel: what a caller sees when retries run out or the channel closes."""
import socket
import threading
import time

import grpc
import pytest

from recsys.client import RecommenderClient


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("close_after", [0.0, 0.03, 0.1, 0.3])
def test_a_stream_whose_channel_closes_between_attempts_fails_as_an_rpc_error(close_after):
    client = RecommenderClient(f"127.0.0.1:{_closed_port()}", timeout=5)
    outcome = []

    def call():
        try:
            client.recommend("42")
        except Exception as error:  # noqa: BLE001 - the test is about which exception it is
            outcome.append(error)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(close_after)
    client.close()
    caller.join(timeout=10)
    assert not caller.is_alive()
    assert isinstance(outcome[0], grpc.RpcError), repr(outcome[0])
    assert outcome[0].code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


def test_a_stream_gives_up_after_its_attempts_not_at_its_deadline():
    client = RecommenderClient(f"127.0.0.1:{_closed_port()}")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as error:
        client.recommend("42", timeout=10)
    took = time.monotonic() - started
    client.close()
    # Four attempts, refused at once, with at most 0.1 + 0.2 + 0.4 s of backoff between them.
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and took < 3
