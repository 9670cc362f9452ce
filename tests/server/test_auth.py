"""Scoped credentials on a real gRPC server (fake backend, real SQLite store): JWTs verified with a
public key grant scopes and may be bound to one user; the shared token may do everything; health stays
open; every erasure leaves an audit line naming who asked."""
import json
import logging
import time

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.client import RecommenderClient
from recsys.server.app import create_server
from recsys.server.options import ServerOptions
from recsys.server.store import open_store
from recsys.v1 import recommender_pb2
from tests.conftest import STORE_READ_SECONDS, status_of
from tests.fake_backend import FakeBackend, write_fake_metadata

SHARED_TOKEN = "shared-secret-token"


@pytest.fixture(scope="module")
def signing_key():
    return ec.generate_private_key(ec.SECP256R1())


def token(key, scope: str = "", sub: str | None = None, expires_in: float = 300, kid: str = "test-key") -> str:
    claims = {"scope": scope, "exp": int(time.time() + expires_in)}
    if sub is not None:
        claims["sub"] = sub
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


@pytest.fixture()
def server_port(tmp_path, signing_key):
    models = write_fake_metadata(tmp_path / "models")
    public = signing_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    store = open_store(str(tmp_path / "s.sqlite3"))
    server, port = create_server("127.0.0.1:0", FakeBackend(models), models,
                                 ServerOptions(poll_seconds=0.2, auth_token=SHARED_TOKEN, auth_jwt_key=public,
                                               store_read_seconds=STORE_READ_SECONDS),
                                 store=store)
    server.start()
    try:
        yield port
    finally:
        server.stop(0).wait(10)
        store.close()


def client_with(port: int, bearer: str | None) -> RecommenderClient:
    return RecommenderClient(f"127.0.0.1:{port}", timeout=10, token=bearer)


def test_scopes_grant_exactly_their_calls(server_port, signing_key):
    with client_with(server_port, token(signing_key, "recommend")) as reader:
        assert len(reader.recommend("u1", k=3)) == 3
        assert reader.model_info().model_version == "1"
        code, details = status_of(lambda: reader.record_interactions("u1", [("m1", 4.0)]))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "'record' scope" in details
        assert status_of(lambda: reader.forget_user("u1"))[0] == grpc.StatusCode.PERMISSION_DENIED
    with client_with(server_port, token(signing_key, "record forget")) as writer:
        assert writer.record_interactions("u9", [("m1", 4.0)]) == 1
        assert writer.forget_user("u9") == 1
        assert status_of(lambda: writer.recommend("u9"))[0] == grpc.StatusCode.PERMISSION_DENIED


def test_a_token_bound_to_a_user_reads_and_writes_that_user_only(server_port, signing_key):
    with client_with(server_port, token(signing_key, "recommend record", sub="u7")) as own:
        assert own.record_interactions("u7", [("m3", 5.0)]) == 1
        assert len(own.recommend("u7", k=3)) == 3
        for call in (lambda: own.recommend("u1"), lambda: own.record_interactions("u1", [("m1", 1.0)]),
                     lambda: own.recommend_batch(["u7", "u1"]), lambda: own.similar("m1", user_id="u1")):
            code, details = status_of(call)
            assert code == grpc.StatusCode.PERMISSION_DENIED and "its own user id" in details
        assert len(own.similar("m1", k=3)) == 3, "no user named: nobody's data"


@pytest.mark.parametrize("bearer, what", [
    (None, "no token"),
    ("not-a-token", "garbage"),
    ("expired", "expired"),
    ("wrong-key", "signed by another key"),
])
def test_without_a_valid_credential_every_call_is_unauthenticated_but_health(server_port, signing_key, bearer, what):
    if bearer == "expired":
        bearer = token(signing_key, "recommend", expires_in=-60)
    elif bearer == "wrong-key":
        bearer = token(ec.generate_private_key(ec.SECP256R1()), "recommend record forget")
    with client_with(server_port, bearer) as caller:
        assert status_of(lambda: caller.recommend("u1"))[0] == grpc.StatusCode.UNAUTHENTICATED, what
        assert status_of(lambda: caller.model_info())[0] == grpc.StatusCode.UNAUTHENTICATED, what
        health = health_pb2_grpc.HealthStub(caller.channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_the_shared_token_may_do_everything(server_port):
    with client_with(server_port, SHARED_TOKEN) as backend_service:
        assert backend_service.record_interactions("anyone", [("m2", 3.0)]) == 1
        assert len(backend_service.recommend("anyone", k=2)) == 2
        assert backend_service.forget_user("anyone") == 1


def test_every_erasure_is_audited_with_who_asked(server_port, signing_key, caplog):
    with caplog.at_level(logging.INFO, logger="recsys.audit"):
        with client_with(server_port, token(signing_key, "record forget", sub="u5")) as own:
            own.record_interactions("u5", [("m1", 4.0)])
            own.forget_user("u5")
        with client_with(server_port, token(signing_key, "forget", kid="ops-key")) as operator:
            operator.forget_user("u6")
    lines = [json.loads(record.getMessage()) for record in caplog.records if record.name == "recsys.audit"]
    assert [(line["user_id"], line["by"], line["forgotten"]) for line in lines] == [
        ("u5", "sub=u5", 1), ("u6", "kid=ops-key", 0)]
    assert all(line["event"] == "erasure" and abs(line["at"] - time.time()) < 60 for line in lines)


def test_reflection_needs_a_credential(server_port):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{server_port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as error:
            list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(stub.ServerReflectionInfo(iter([request]), timeout=5,
                                                 metadata=(("authorization", f"Bearer {SHARED_TOKEN}"),)))
        assert any(service.name == recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
                   for service in answers[0].list_services_response.service)


def test_with_a_log_key_logs_show_a_keyed_hash_of_user_ids(tmp_path, caplog):
    import hashlib
    import hmac

    models = write_fake_metadata(tmp_path / "models")
    store = open_store(str(tmp_path / "s.sqlite3"))
    server, port = create_server("127.0.0.1:0", FakeBackend(models), models,
                                 ServerOptions(poll_seconds=0.2, log_user_id_key=b"log-key",
                                               store_read_seconds=STORE_READ_SECONDS), store=store)
    server.start()
    try:
        with caplog.at_level(logging.INFO), client_with(port, None) as caller:
            caller.record_interactions("private-user", [("m1", 4.0)])
            caller.forget_user("private-user")
    finally:
        server.stop(0).wait(10)
        store.close()
    hashed = hmac.new(b"log-key", b"private-user", hashlib.sha256).hexdigest()[:16]
    lines = [json.loads(record.getMessage()) for record in caplog.records
             if record.name in ("recsys.audit", "recsys.requests")]
    assert {line["user_id"] for line in lines} == {hashed} and len(lines) == 3
    assert not any("private-user" in record.getMessage() for record in caplog.records)
