"""Who may call what: a bearer credential for every service except health (probes stay open), and
scopes per Recommender call.

A caller is a `Principal`: the scopes it holds and, optionally, the one user id it may act for.
Credentials, as the server is started:
- none: every caller holds every scope, for any user (a loopback or otherwise private port);
- a shared token (`--auth-token-file`): its holders hold every scope, for any user (one trusted
  backend);
- JWTs signed by your identity provider (`--auth-jwt-key`, a PEM public key; RS256, ES256 or
  EdDSA), with `exp` required: the `scope` claim (space-separated, OAuth style) grants scopes, and
  a `sub` claim binds the token to that user id. Both may be accepted side by side.

Scopes: `recommend` (Recommend, RecommendBatch, SimilarItems, GetModelInfo), `record`
(RecordInteractions), `forget` (ForgetUser). A missing or invalid credential is UNAUTHENTICATED;
a valid one without the call's scope, or bound to another user, is PERMISSION_DENIED.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import grpc

from recsys.server.errors import PermissionDenied, Unauthenticated

OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.Health/",)
RECOMMENDER_PREFIX = "/recsys.v1.Recommender/"
SCOPE_OF_METHOD = {"Recommend": "recommend", "RecommendBatch": "recommend", "SimilarItems": "recommend",
                   "GetModelInfo": "recommend", "RecordInteractions": "record", "ForgetUser": "forget"}
ALL_SCOPES = frozenset(SCOPE_OF_METHOD.values())
JWT_ALGORITHMS = ("RS256", "ES256", "EdDSA")


def read_token(path: Path) -> str:
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"{path} is empty; it must hold the bearer token")
    return token


@dataclass(frozen=True)
class Principal:
    """Who is calling: `scopes` held, `user_id` the one user they may act for ("" = any), and how
    an audit line names them."""

    scopes: frozenset[str]
    user_id: str = ""
    name: str = "anyone"

    def check_scope(self, method: str) -> None:
        scope = SCOPE_OF_METHOD[method]
        if scope not in self.scopes:
            raise PermissionDenied(f"{method} needs the '{scope}' scope; this credential has "
                                   f"{', '.join(sorted(self.scopes)) or 'none'}")

    def check_users(self, user_ids: Iterable[str]) -> None:
        """A credential bound to one user may name only that user (an empty id names no one)."""
        if not self.user_id:
            return
        for user_id in user_ids:
            if user_id and user_id != self.user_id:
                raise PermissionDenied("this credential may act only for its own user id")


ANYONE = Principal(ALL_SCOPES)


class Authenticator:
    """Turns a call's metadata into its `Principal` (raising Unauthenticated)."""

    def __init__(self, token: str | None = None, jwt_key: bytes | None = None, jwt_audience: str | None = None):
        self._token = f"Bearer {token}".encode() if token else None
        self._jwt_key = None
        if jwt_key:
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            self._jwt_key = load_pem_public_key(jwt_key)
        self._audience = jwt_audience

    @property
    def required(self) -> bool:
        return self._token is not None or self._jwt_key is not None

    def principal(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        if not self.required:
            return ANYONE
        supplied = dict(metadata or ()).get("authorization", "")
        if not isinstance(supplied, str) or not supplied.startswith("Bearer "):
            raise Unauthenticated("missing or invalid 'authorization: Bearer <token>' metadata")
        if self._token is not None and hmac.compare_digest(supplied.encode(), self._token):
            return Principal(ALL_SCOPES, name="the shared token")
        if self._jwt_key is not None:
            return self._from_jwt(supplied[len("Bearer "):])
        raise Unauthenticated("missing or invalid 'authorization: Bearer <token>' metadata")

    def _from_jwt(self, token: str) -> Principal:
        import jwt

        try:
            claims = jwt.decode(token, self._jwt_key, algorithms=list(JWT_ALGORITHMS), audience=self._audience,
                                options={"require": ["exp"], "verify_aud": self._audience is not None})
            key_id = jwt.get_unverified_header(token).get("kid", "")
        except jwt.PyJWTError as error:
            raise Unauthenticated(f"invalid bearer token: {error}") from None
        scopes = claims.get("scope", "")
        subject = claims.get("sub", "")
        if not isinstance(scopes, str) or not isinstance(subject, str):
            raise Unauthenticated("invalid bearer token: 'scope' and 'sub' must be strings")
        name = f"sub={subject}" if subject else f"kid={key_id or 'none'}"
        return Principal(frozenset(scopes.split()) & ALL_SCOPES, subject, name)


async def _deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid 'authorization: Bearer <token>' metadata")


class AuthenticationInterceptor(grpc.aio.ServerInterceptor):
    """Every service but health needs a valid credential (reflection included). The Recommender's
    calls are let through to the servicer, which authenticates and authorises each one itself
    (it needs the request's user ids), so its refusals carry their reason."""

    def __init__(self, authenticator: Authenticator):
        self._authenticator = authenticator
        self._deny_handler = grpc.unary_unary_rpc_method_handler(_deny)

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_SERVICE_PREFIXES) or method.startswith(RECOMMENDER_PREFIX):
            return await continuation(handler_call_details)
        try:
            self._authenticator.principal(handler_call_details.invocation_metadata)
        except Unauthenticated:
            return self._deny_handler
        return await continuation(handler_call_details)
