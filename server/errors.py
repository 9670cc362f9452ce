"""Domain errors and their one mapping to gRPC status codes."""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from typing import Callable

import grpc

log = logging.getLogger("recsys.server")


class RecsysError(Exception):
    """Base for errors whose message is safe to show to callers."""

    code = grpc.StatusCode.INTERNAL


class InvalidRequest(RecsysError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RecsysError):
    code = grpc.StatusCode.NOT_FOUND


class ModelsUnavailable(RecsysError):
    """No model can answer right now (not loaded yet, backend down); retrying may help."""

    code = grpc.StatusCode.UNAVAILABLE


class BackendMisconfigured(RecsysError):
    """The backend answers but lacks the model, version or signature we were told to use."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(RecsysError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(RecsysError):
    code = grpc.StatusCode.CANCELLED


class Overloaded(RecsysError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


def _status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, RecsysError):
        return error.code, str(error)
    log.exception("unexpected error")
    return grpc.StatusCode.INTERNAL, "internal error; see server logs"


def map_errors(method: Callable) -> Callable:
    """The one place errors become statuses: domain errors keep their code and message,
    anything else is a bare INTERNAL. Also opens and closes the call's CallRecord
    (`self.observer`), which the method receives as its last argument.

    For grpc.aio servicer methods: async generators (server streaming) and coroutines.
    """
    name = method.__name__
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def stream(self, request, context):
            record = self.observer.begin(name, context)
            try:
                async for response in method(self, request, context, record):
                    yield response
            except (GeneratorExit, asyncio.CancelledError):  # the client cancelled or the deadline passed
                self.observer.finish(record, grpc.StatusCode.CANCELLED)
                raise
            except Exception as error:  # noqa: BLE001 - this is the one place errors are mapped
                code, message = _status_of(error)
                self.observer.finish(record, code)
                await context.abort(code, message)
            self.observer.finish(record, grpc.StatusCode.OK)
        return stream

    @functools.wraps(method)
    async def unary(self, request, context):
        record = self.observer.begin(name, context)
        try:
            response = await method(self, request, context, record)
        except asyncio.CancelledError:
            self.observer.finish(record, grpc.StatusCode.CANCELLED)
            raise
        except Exception as error:  # noqa: BLE001
            code, message = _status_of(error)
            self.observer.finish(record, code)
            await context.abort(code, message)
        self.observer.finish(record, grpc.StatusCode.OK)
        return response
    return unary
