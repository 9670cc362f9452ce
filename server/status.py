"""The gRPC edge's one map from domain errors to status codes, and the decorator that applies it."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from typing import Callable

import grpc

from recsys.server.errors import (
    BackendMisconfigured,
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    ModelsUnavailable,
    NotConfigured,
    NotFound,
    Overloaded,
    PermissionDenied,
    RecsysError,
    StoreUnavailable,
    Unauthenticated,
)
from recsys.server.sending import StallTimer
from recsys.server.wire import Undecodable

log = logging.getLogger("recsys.server")

STATUS_OF_ERROR: dict[type[RecsysError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ModelsUnavailable: grpc.StatusCode.UNAVAILABLE,
    BackendMisconfigured: grpc.StatusCode.FAILED_PRECONDITION,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    NotConfigured: grpc.StatusCode.FAILED_PRECONDITION,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}

# The HTTP face's status for each code, as grpc-gateway maps them (runtime/errors.go, HTTPStatusFromCode).
HTTP_STATUS_OF_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DATA_LOSS: 500,
}


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """Domain errors keep their message; anything else is a bare INTERNAL (the stack goes to the log)."""
    if isinstance(error, RecsysError):
        for kind in type(error).__mro__:
            if kind in STATUS_OF_ERROR:
                return STATUS_OF_ERROR[kind], str(error)
    log.exception("unexpected error")
    return grpc.StatusCode.INTERNAL, "internal error; see server logs"


def _check_decoded(request) -> None:
    if isinstance(request, Undecodable):
        raise InvalidRequest(request.reason)


def _requested_users(request) -> list[str]:
    if hasattr(request, "requests"):  # RecommendBatch
        return [entry.user_id for entry in request.requests]
    return [request.user_id] if hasattr(request, "user_id") else []


def _authorize(servicer, name: str, request, context, record) -> None:
    """Authenticate the caller, check the call's scope and the users it names (the servicer's
    `authenticator`); the principal goes into the call's record (audit lines name it)."""
    record.principal = servicer.authenticator.principal(context.invocation_metadata())
    record.principal.check_scope(name)
    _check_decoded(request)
    record.principal.check_users(_requested_users(request))


def map_errors(method: Callable) -> Callable:
    """The one place errors become statuses. Also opens and closes the call's CallRecord
    (`self.observer`), which the method receives as its last argument.

    For grpc.aio servicer methods: async generators (server streaming; each becomes a coroutine that
    writes what the generator yields, see server/sending.py) and coroutines.
    """
    name = method.__name__
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            record = self.observer.begin(name, context.invocation_metadata())
            timer = None
            try:
                _authorize(self, name, request, context, record)
                async with contextlib.aclosing(method(self, request, context, record)) as responses:
                    async for response in responses:
                        if timer is None:  # sending starts: bound how long it may take (server/sending.py)
                            timer = StallTimer(self.send_stall_seconds)
                        try:
                            await context.write(response)
                        except Exception:  # noqa: BLE001 - the call is over (the client went away): no status to send
                            self.observer.finish(record, grpc.StatusCode.CANCELLED.name)
                            return
            except asyncio.CancelledError:  # the client cancelled, the deadline passed, or the client stalled
                if timer is not None and timer.fired:
                    self.observer.metrics.stalled_streams.inc()
                self.observer.finish(record, grpc.StatusCode.CANCELLED.name)
                raise
            except Exception as error:  # noqa: BLE001 - this is the one place errors are mapped
                code, message = status_of(error)
                self.observer.finish(record, code.name)
                await context.abort(code, message)
            finally:
                if timer is not None:
                    timer.cancel()
            self.observer.finish(record, grpc.StatusCode.OK.name)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        record = self.observer.begin(name, context.invocation_metadata())
        try:
            _authorize(self, name, request, context, record)
            response = await method(self, request, context, record)
        except asyncio.CancelledError:
            self.observer.finish(record, grpc.StatusCode.CANCELLED.name)
            raise
        except Exception as error:  # noqa: BLE001
            code, message = status_of(error)
            self.observer.finish(record, code.name)
            await context.abort(code, message)
        self.observer.finish(record, grpc.StatusCode.OK.name)
        return response
    return unary
