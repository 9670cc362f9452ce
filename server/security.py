"""Bearer-token authentication for every service except health (probes stay open)."""
from __future__ import annotations

import hmac
from pathlib import Path

import grpc

OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.Health/",)


def read_token(path: Path) -> str:
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"{path} is empty; it must hold the bearer token")
    return token


async def _deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid 'authorization: Bearer <token>' metadata")


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()
        self._deny_handler = grpc.unary_unary_rpc_method_handler(_deny)

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_SERVICE_PREFIXES):
            return await continuation(handler_call_details)
        supplied = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if isinstance(supplied, str) and hmac.compare_digest(supplied.encode(), self._expected):
            return await continuation(handler_call_details)
        return self._deny_handler
