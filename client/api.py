"""RecommenderClient: the generated stubs' friendly face. Every call carries a deadline."""
from __future__ import annotations

import time
from typing import Iterable, Mapping, Union

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.client.retry import SERVICE_CONFIG, RetriedStream, RetryBudget
from recsys.v1 import ITEM_TITLE_METADATA, UNKNOWN_INTERACTIONS_METADATA, recommender_pb2, recommender_pb2_grpc

DEFAULT_TIMEOUT_SECONDS = 5.0
RETRY_BUFFER_BYTES = 4 * 1024 * 1024


class RankedItems(list):
    """A call's items, best first. Recommend: `unknown_interactions`, how many of the user's
    interactions (sent or stored) named movies the served models do not know (they were ignored).
    SimilarItems: `item_title`, the queried movie's title."""

    unknown_interactions: int = 0
    item_title: str = ""


# An interaction: (movie id, stars[, unix seconds]) or the message itself.
InteractionLike = Union[tuple, recommender_pb2.Interaction]


def interaction(entry: InteractionLike) -> recommender_pb2.Interaction:
    """(movie id, stars[, unix seconds]) as the message; stars 0 means no rating, no time 0 (unknown)."""
    if isinstance(entry, recommender_pb2.Interaction):
        return entry
    item_id, rating, *rest = entry
    return recommender_pb2.Interaction(item_id=str(item_id), rating=float(rating),
                                       timestamp_seconds=int(rest[0]) if rest else 0)


def channel_target(target: str) -> str:
    """"host:port" as is; several comma-separated addresses become an ipv4/ipv6 target list
    that gRPC balances over (e.g. "10.0.0.1:50051,10.0.0.2:50051")."""
    addresses = [address.strip() for address in target.split(",") if address.strip()]
    if len(addresses) < 2:
        return target
    scheme = "ipv6" if all(address.startswith("[") for address in addresses) else "ipv4"
    return f"{scheme}:" + ",".join(addresses)


class RecommenderClient:
    """Talks to a recommender target: "host:port", a resolvable name such as
    "dns:///recommender:50051" (e.g. a Kubernetes headless service), or several
    comma-separated "ip:port" addresses. Calls are spread with gRPC's round_robin policy, and
    calls that get UNAVAILABLE, or CANCELLED by a server shutting down, are retried
    (`client.retry.RETRY_POLICY`).

    Errors surface as grpc.RpcError with the server's status code and message.
    """

    def __init__(self, target: str, timeout: float = DEFAULT_TIMEOUT_SECONDS, ca_cert: bytes | None = None,
                 token: str | None = None, channel: grpc.Channel | None = None):
        """`ca_cert`: PEM root certificate(s) to trust; enables TLS. `token`: sent as a bearer token."""
        self.target = target
        self.timeout = timeout
        if channel is None:
            # gRPC retries a call only while its messages fit the retry buffers (256 KiB a call by
            # default): sized for the largest request a server takes (4 MiB), so a RecommendBatch of
            # 100 users with their interactions is retried like any other call.
            options = [("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1),
                       ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
                       ("grpc.retry_buffer_size", 4 * RETRY_BUFFER_BYTES)]
            if ca_cert is not None:
                channel = grpc.secure_channel(channel_target(target),
                                              grpc.ssl_channel_credentials(root_certificates=ca_cert), options)
            else:
                channel = grpc.insecure_channel(channel_target(target), options)
        self.channel = channel
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.stub = recommender_pb2_grpc.RecommenderStub(self.channel)
        self.retry_budget = RetryBudget()  # the streamed calls' retry throttling (the channel has the unary calls')
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _streamed(self, method: grpc.UnaryStreamMultiCallable, request, timeout: float | None) -> RetriedStream:
        """A server-streamed call, each attempt with the time its deadline leaves."""
        return RetriedStream(lambda left: method(request, timeout=left, metadata=self.metadata),
                             self._deadline(timeout), self.retry_budget)

    @staticmethod
    def _request(user_id: str, k: int, exclude: Iterable[str], include_rated: bool,
                 interactions: Iterable[InteractionLike]) -> recommender_pb2.RecommendRequest:
        return recommender_pb2.RecommendRequest(user_id=str(user_id), k=k, exclude_item_ids=list(exclude),
                                                include_rated=include_rated,
                                                recent_interactions=[interaction(entry) for entry in interactions])

    def stream(self, user_id: str, k: int = 10, exclude: Iterable[str] = (), include_rated: bool = False,
               timeout: float | None = None,
               interactions: Iterable[InteractionLike] = ()) -> RetriedStream:
        """Items as the server streams them, best first. `interactions`: what the user did recently,
        as (movie id, stars[, unix seconds]) tuples (stars 0: no rating) or Interaction messages."""
        return self._streamed(self.stub.Recommend, self._request(user_id, k, exclude, include_rated, interactions),
                              timeout)

    def recommend(self, user_id: str, k: int = 10, exclude: Iterable[str] = (), include_rated: bool = False,
                  timeout: float | None = None,
                  interactions: Iterable[InteractionLike] = ()) -> RankedItems:
        stream = self.stream(user_id, k, exclude, include_rated, timeout, interactions)
        items = RankedItems(stream)
        items.unknown_interactions = int(dict(stream.trailing_metadata() or ()).get(UNKNOWN_INTERACTIONS_METADATA, 0))
        return items

    def recommend_batch(self, user_ids: Iterable[str], k: int = 10, exclude: Iterable[str] = (),
                        include_rated: bool = False, timeout: float | None = None,
                        interactions: Mapping[str, Iterable[InteractionLike]] | None = None,
                        ) -> list[recommender_pb2.Recommendations]:
        """One list per user, in order; `interactions` maps a user id to that user's recent interactions."""
        excluded = list(exclude)
        request = recommender_pb2.RecommendBatchRequest(requests=[
            self._request(user_id, k, excluded, include_rated, (interactions or {}).get(str(user_id), ()))
            for user_id in user_ids])
        return list(self.stub.RecommendBatch(request, timeout=self._deadline(timeout), metadata=self.metadata).results)

    def similar(self, item_id: str, k: int = 10, exclude: Iterable[str] = (), user_id: str = "",
                timeout: float | None = None) -> RankedItems:
        """"More like this": the movies nearest `item_id`; with `user_id`, without their history and
        ordered for them."""
        request = recommender_pb2.SimilarItemsRequest(item_id=str(item_id), k=k, exclude_item_ids=list(exclude),
                                                      user_id=str(user_id))
        stream = self._streamed(self.stub.SimilarItems, request, timeout)
        items = RankedItems(stream)
        items.item_title = dict(stream.trailing_metadata() or ()).get(ITEM_TITLE_METADATA, b"").decode("utf-8")
        return items

    def record_interactions(self, user_id: str, interactions: Iterable[InteractionLike],
                            timeout: float | None = None) -> int:
        """Store what the user did (durable once this returns), for their later lists and the next
        training run; returns how many movies were recorded. Safe to retry: interactions without a
        time are stamped now, once, before the first attempt, so a retry never records a later time
        than the original (nor revives a user erased in between)."""
        now = int(time.time())
        entries = [recommender_pb2.Interaction(item_id=entry.item_id, rating=entry.rating,
                                               timestamp_seconds=entry.timestamp_seconds or now)
                   for entry in map(interaction, interactions)]
        request = recommender_pb2.RecordInteractionsRequest(user_id=str(user_id), interactions=entries)
        return self.stub.RecordInteractions(request, timeout=self._deadline(timeout), metadata=self.metadata).recorded

    def forget_user(self, user_id: str, timeout: float | None = None) -> int:
        """Erase the user's stored interactions; returns how many there were."""
        return self.stub.ForgetUser(recommender_pb2.ForgetUserRequest(user_id=str(user_id)),
                                    timeout=self._deadline(timeout), metadata=self.metadata).forgotten

    def model_info(self, timeout: float | None = None) -> recommender_pb2.ModelInfo:
        return self.stub.GetModelInfo(recommender_pb2.GetModelInfoRequest(), timeout=self._deadline(timeout),
                                      metadata=self.metadata)

    def health(self, service: str = "recsys.v1.Recommender", timeout: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", ... as the standard grpc.health.v1 service reports it."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                          timeout=self._deadline(timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Block until health says SERVING (models loaded), or raise TimeoutError."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=min(2.0, max(0.1, deadline - time.monotonic()))) == "SERVING":
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.target} was not SERVING within {timeout:.0f}s")
            time.sleep(0.2)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RecommenderClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
