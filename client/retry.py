"""How the client retries: one policy, applied by the channel to unary calls and by
`RetriedStream` to the server-streamed ones."""
from __future__ import annotations

import json
import random
import threading
import time
from typing import Callable, Iterator

import grpc

from recsys.v1 import recommender_pb2

SERVICE = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"]
UNARY_METHODS = tuple(method.name for method in SERVICE.methods if not method.server_streaming)

# Every call is safe to repeat (reads, and writes that record one row per user and movie). An
# UNAVAILABLE (a replica draining after GOAWAY, a connection reset, a model not loaded yet, the
# store down for a moment) is retried with backoff within the call's deadline. So is CANCELLED:
# this client never retries a call it cancelled itself, and a gRPC server answers CANCELLED for a
# call that reached it as it shut down, before any handler took it (grpc/grpc#41785).
RETRY_POLICY = {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]}
# The channel applies the policy to unary calls only. Applied to a streamed call, grpcio 1.85 was
# seen to leave a call that a server's exit cut before its first item waiting past its deadline,
# until the channel closed (docs/operations.md); `RetriedStream` applies it to those instead.
# Retry throttling (A6): each failed attempt takes a token, each success gives back a tenth of one,
# and no call is retried while half or fewer of the tokens are left. During an outage, retries stop
# after 20 failures instead of multiplying every caller's load by maxAttempts; a replica draining
# under a client's 16 concurrent calls still has each of them retried.
RETRY_THROTTLING = {"maxTokens": 40, "tokenRatio": 0.1}
SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{"name": [{"service": SERVICE.full_name, "method": method} for method in UNARY_METHODS],
                      "retryPolicy": RETRY_POLICY}],
    "retryThrottling": RETRY_THROTTLING,
})
RETRYABLE_CODES = frozenset(grpc.StatusCode[name] for name in RETRY_POLICY["retryableStatusCodes"])


def _seconds(duration: str) -> float:
    return float(duration.rstrip("s"))


class RetryBudget:
    """`RETRY_THROTTLING` for the streamed calls, which the channel does not retry: one budget per
    client, as the channel keeps one for its unary calls."""

    def __init__(self, max_tokens: float = RETRY_THROTTLING["maxTokens"],
                 token_ratio: float = RETRY_THROTTLING["tokenRatio"]):
        self.max_tokens, self.token_ratio = float(max_tokens), float(token_ratio)
        self.tokens = self.max_tokens
        self._lock = threading.Lock()

    def failed(self) -> bool:
        """Count a retryable failure; returns whether a retry is still allowed."""
        with self._lock:
            self.tokens = max(0.0, self.tokens - 1)
            return self.tokens > self.max_tokens / 2

    def succeeded(self) -> None:
        with self._lock:
            self.tokens = min(self.max_tokens, self.tokens + self.token_ratio)


class RetriedStream:
    """A server-streamed call, retried as `RETRY_POLICY` says, and, as gRPC retries streams, only
    until its first item arrives: after that a failure is the caller's to see. Iterate it like the
    call gRPC returns; `cancel()` ends it and is never retried.

    Backoff follows gRPC's retry design (A6): the n-th retry waits a random time up to
    min(initialBackoff * backoffMultiplier**(n-1), maxBackoff), all within the one deadline."""

    def __init__(self, start: Callable[[float], grpc.Call], timeout: float, budget: RetryBudget | None = None):
        """`start(timeout)`: begins one attempt with that many seconds left; `budget`: the client's
        retry throttling (none: retries are not throttled)."""
        self._start = start
        self._budget = budget
        self._deadline = time.monotonic() + timeout
        self._attempts = 1
        self._backoff = _seconds(RETRY_POLICY["initialBackoff"])
        self._received = False
        self._cancelled = threading.Event()
        self._call = start(timeout)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        while True:
            try:
                item = next(self._call)
            except grpc.RpcError as error:
                self._retry_or_raise(error)
                continue
            if not self._received and self._budget is not None:
                self._budget.succeeded()
            self._received = True
            return item

    def _retry_or_raise(self, error: grpc.RpcError) -> None:
        if self._received or self._cancelled.is_set() or error.code() not in RETRYABLE_CODES:
            raise error
        if (self._budget is not None and not self._budget.failed()) or self._attempts >= RETRY_POLICY["maxAttempts"]:
            raise error
        delay = random.uniform(0, self._backoff)
        if time.monotonic() + delay >= self._deadline:
            raise error
        if self._cancelled.wait(delay):
            raise error
        self._backoff = min(self._backoff * RETRY_POLICY["backoffMultiplier"],
                            _seconds(RETRY_POLICY["maxBackoff"]))
        self._attempts += 1
        try:
            self._call = self._start(self._deadline - time.monotonic())
        except ValueError:  # the channel was closed meanwhile: the last attempt's status stands
            raise error from None
        if self._cancelled.is_set():  # cancel() ran while this attempt was starting
            self._call.cancel()

    def trailing_metadata(self):
        """The last attempt's trailing metadata (once the stream has ended)."""
        return self._call.trailing_metadata()

    def cancel(self) -> bool:
        self._cancelled.set()
        return self._call.cancel()
