"""The JSON/HTTP face (aiohttp, on the gRPC server's event loop): the same contract over HTTP/1.1.

Each RPC of recommender.proto is a route, `POST /v1/<method in kebab case>` (GetModelInfo also
answers GET), its body the request message in proto3's JSON mapping (`google.protobuf.json_format`).
Every call goes through the gRPC servicer itself, with `HttpCallContext` in place of grpc.aio's
context: admission, validation, credentials (`Authorization: Bearer`), logging, metrics and the
one map of errors to statuses (server/status.py) are the gRPC service's, unchanged.

- Unary calls answer one JSON object.
- Recommend and SimilarItems stream newline-delimited JSON (`application/x-ndjson`), one
  RankedItem per line, best first. Errors come before the first line, as a JSON error object
  with the HTTP status grpc-gateway gives the gRPC code. Their trailing metadata are response
  headers (Recommend's `unknown-interactions`; SimilarItems' `item-title-bin`, base64 as in gRPC).
- `GET /v1/openapi.json` describes the routes (server/openapi.py); `GET /` is a page to try the
  service (server/web/index.html); `GET /v1/health` is readiness (200 or 503), `GET
  /v1/health/live` liveness, as gRPC health's two names.
- With the server's TLS pair (`--tls-cert`, `--tls-key`) the face serves HTTPS only, like the gRPC port.
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Callable

import grpc
from aiohttp import web
from google.protobuf import json_format

from recsys.server.openapi import openapi_document
from recsys.server.status import HTTP_STATUS_OF_CODE
from recsys.server.wire import SERVICE, Undecodable
from recsys.v1 import recommender_pb2

# HTTP has no deadline of its own: every call gets this long, as a gRPC caller's deadline.
HTTP_TIMEOUT_SECONDS = 10.0
# Bodies larger than this are parsed on a worker thread, not on the event loop that carries every call.
LARGE_BODY_BYTES = 64 * 1024


def route_of(method_name: str) -> str:
    """"RecommendBatch" -> "/v1/recommend-batch"."""
    return "/v1/" + re.sub(r"(?<!^)(?=[A-Z])", "-", method_name).lower()


def to_json(message) -> dict:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def error_response(code: grpc.StatusCode, message: str) -> web.Response:
    """google.rpc.Status in JSON, as grpc-gateway answers errors."""
    return web.json_response({"code": code.value[0], "status": code.name, "message": message},
                             status=HTTP_STATUS_OF_CODE.get(code, 500))


class _Aborted(Exception):
    """The servicer ended the call with a status (grpc.aio raises its AbortError here)."""


class HttpCallContext:
    """What the servicer asks of a grpc.aio ServicerContext, for one HTTP request."""

    def __init__(self, request: web.Request, timeout: float):
        self._request = request
        self._expires = time.monotonic() + timeout
        self._callbacks: list[Callable] = []
        self._trailing: tuple = ()
        self.response: web.StreamResponse | None = None  # once a streamed call writes its first item
        self.status: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple((name.lower(), value) for name, value in self._request.headers.items())

    def time_remaining(self) -> float:
        return max(0.0, self._expires - time.monotonic())

    def peer(self) -> str:
        peer = self._request.transport.get_extra_info("peername") if self._request.transport else None
        return f"http:{peer[0]}:{peer[1]}" if peer else "http:unknown"

    def add_done_callback(self, callback: Callable) -> None:
        self._callbacks.append(callback)

    def set_trailing_metadata(self, metadata) -> None:
        self._trailing = tuple(metadata)

    async def write(self, message) -> None:
        if self.response is None:
            self.response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", **self._headers()})
            await self.response.prepare(self._request)
        await self.response.write(_json_body(message) + b"\n")

    def _headers(self) -> dict[str, str]:
        """The trailing metadata set before the first item, as headers ("-bin" values in base64, as gRPC
        carries them)."""
        return {key: base64.b64encode(value).decode() if isinstance(value, bytes) else value
                for key, value in self._trailing}

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.status = (code, details)
        raise _Aborted()

    def finish(self) -> None:
        for callback in self._callbacks:
            callback(self)


def _parsed(body: str, request_class):
    """The request message, or Undecodable (the servicer answers INVALID_ARGUMENT, naming the problem)."""
    try:
        return json_format.Parse(body or "{}", request_class())
    except json_format.ParseError as error:
        return Undecodable(f"the body is not a {request_class.DESCRIPTOR.full_name} in JSON: {error}")


def _json_body(message) -> bytes:
    return json.dumps(to_json(message), ensure_ascii=False).encode()


def _handler(servicer, method) -> Callable:
    request_class = getattr(recommender_pb2, method.input_type.name)
    call = getattr(servicer, method.name)

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.text()
        if len(body) > LARGE_BODY_BYTES:
            message = await asyncio.to_thread(_parsed, body, request_class)
        else:
            message = _parsed(body, request_class)
        context = HttpCallContext(request, HTTP_TIMEOUT_SECONDS)
        try:
            response = await call(message, context)
        except _Aborted:
            if context.response is None:
                return error_response(*context.status)
            await context.response.write(json.dumps({"error": context.status[1]}).encode() + b"\n")
            return context.response
        finally:
            context.finish()
        if not method.server_streaming:  # up to 10,000 items (RecommendBatch): written out off the loop
            return web.Response(body=await asyncio.to_thread(_json_body, response), content_type="application/json")
        if context.response is None:  # no items
            context.response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await context.response.prepare(request)
        await context.response.write_eof()
        return context.response
    return handle


def build_app(servicer, is_ready: Callable[[], bool], max_request_bytes: int) -> web.Application:
    """The routes over `servicer` (a RecommenderServicer); `is_ready` answers GET /v1/health."""
    app = web.Application(client_max_size=max_request_bytes)
    for method in SERVICE.methods:
        handle = _handler(servicer, method)
        app.router.add_post(route_of(method.name), handle)
        if method.name == "GetModelInfo":
            app.router.add_get(route_of(method.name), handle)
    document = openapi_document({method.name: route_of(method.name) for method in SERVICE.methods})
    page = resources.files("recsys.server").joinpath("web/index.html").read_bytes()

    async def openapi(_: web.Request) -> web.Response:
        return web.json_response(document)

    async def health(_: web.Request) -> web.Response:
        ready = is_ready()
        return web.json_response({"status": "SERVING" if ready else "NOT_SERVING"}, status=200 if ready else 503)

    async def live(_: web.Request) -> web.Response:  # gRPC health's "" service: the process answers
        return web.json_response({"status": "SERVING"})

    async def index(_: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/health/live", live)
    app.router.add_get("/", index)
    return app


def tls_context(certificate_chain: bytes, private_key: bytes) -> ssl.SSLContext:
    """A server context for the PEM pair the gRPC port serves. `ssl` loads keys from files only: the
    pair passes through a private temporary directory, removed at once."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory(prefix="recsys-tls-") as directory:
        chain, key = Path(directory) / "chain.pem", Path(directory) / "key.pem"
        chain.write_bytes(certificate_chain)
        key.touch(0o600)
        key.write_bytes(private_key)
        context.load_cert_chain(chain, key)
    return context


async def start_http(app: web.Application, host: str, port: int,
                     tls: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Serve `app` on the running loop (HTTPS with `tls`); returns the runner (to clean up) and the
    bound port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]") or "::", port, ssl_context=tls)
    await site.start()
    return runner, runner.addresses[0][1]
