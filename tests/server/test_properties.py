"""Random requests against the real server: every answer is OK or a precise status, never
UNKNOWN or INTERNAL, and the server keeps serving."""
import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys.server.limits import DEFAULT_K, MAX_EXCLUDED_ITEMS, MAX_K, MAX_USER_ID_LENGTH
from recsys.v1 import recommender_pb2

user_ids = st.one_of(st.text(max_size=MAX_USER_ID_LENGTH + 20), st.integers(-5, 2000).map(str),
                     st.sampled_from(["", " ", "\t", "42", "0", "943", "944", "\x00", "ß" * 129]))
ks = st.one_of(st.integers(0, 120), st.integers(0, 2**32 - 1))
item_ids = st.one_of(st.integers(0, 1700).map(str), st.text(max_size=12))
exclusions = st.one_of(
    st.lists(item_ids, max_size=40),
    # Very long, duplicated lists around the documented limit.
    st.builds(lambda ids, repeat: (ids * repeat)[:MAX_EXCLUDED_ITEMS + 50],
              st.lists(st.integers(1, 1682).map(str), min_size=1, max_size=20), st.integers(1, 700)),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user_id=user_ids, k=ks, exclude=exclusions, include_rated=st.booleans())
def test_random_requests_get_ok_or_a_precise_status(client, user_id, k, exclude, include_rated):
    try:
        items = client.recommend(user_id, k=k, exclude=exclude, include_rated=include_rated)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        too_long = len(user_id) > MAX_USER_ID_LENGTH
        nul = "\x00" in user_id or any("\x00" in item for item in exclude)  # no store could hold it
        assert (not user_id.strip()) or too_long or nul or k > MAX_K or len(exclude) > MAX_EXCLUDED_ITEMS, \
            error.details()
        return
    assert user_id.strip() and k <= MAX_K and len(exclude) <= MAX_EXCLUDED_ITEMS
    assert "\x00" not in user_id and not any("\x00" in item for item in exclude)
    assert 0 < len(items) <= (k or DEFAULT_K)
    assert [item.rank for item in items] == list(range(1, len(items) + 1))
    assert not {item.item_id for item in items} & set(exclude)
    assert len({item.item_id for item in items}) == len(items)


valid = recommender_pb2.RecommendRequest(user_id="42", k=5, exclude_item_ids=["1", "50"]).SerializeToString()
raw_payloads = st.one_of(st.binary(max_size=200),
                         st.builds(lambda position, byte: valid[:position] + bytes([byte]) + valid[position + 1:],
                                   st.integers(0, len(valid) - 1), st.integers(0, 255)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=raw_payloads, method=st.sampled_from([("Recommend", True), ("RecommendBatch", False),
                                                     ("GetModelInfo", False)]))
def test_raw_bytes_never_get_unknown_or_internal(running_server, payload, method):
    """Whatever arrives on the wire, a valid message or not, the answer is OK or INVALID_ARGUMENT."""
    _, port = running_server
    name, streaming = method
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = (channel.unary_stream if streaming else channel.unary_unary)(
            f"/recsys.v1.Recommender/{name}", request_serializer=lambda raw: raw, response_deserializer=lambda raw: raw)
        try:
            response = call(payload, timeout=10)
            if streaming:
                list(response)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())


def test_server_still_serves_after_the_storm(client):
    assert len(client.recommend("42")) == 10
