import grpc
import pytest

from client import RecommenderClient
from server.app import ServerOptions, create_server
from server.backend import InProcessBackend


@pytest.fixture(scope="session")
def running_server(models_dir):
    """The real server on a loopback port, serving the session's export in-process."""
    backend = InProcessBackend(models_dir)
    recommender, port = create_server("127.0.0.1:0", backend, models_dir, ServerOptions(poll_seconds=0.5))
    recommender.start()
    client = RecommenderClient(f"127.0.0.1:{port}", timeout=10)
    client.wait_until_serving(60)
    yield recommender, port
    client.close()
    recommender.stop(1).wait()


@pytest.fixture()
def client(running_server):
    _, port = running_server
    with RecommenderClient(f"127.0.0.1:{port}", timeout=10) as recommender_client:
        yield recommender_client


def status_of(call) -> tuple[grpc.StatusCode, str]:
    """The status code and message a call fails with (it must fail)."""
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code(), error.value.details()
