"""Domain errors and their one mapping to gRPC status codes."""
from __future__ import annotations

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


class Overloaded(RecsysError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


def _abort(context: grpc.ServicerContext, error: Exception) -> None:
    if isinstance(error, RecsysError):
        context.abort(error.code, str(error))
    log.exception("unexpected error")
    context.abort(grpc.StatusCode.INTERNAL, "internal error; see server logs")


def map_errors(method: Callable) -> Callable:
    """Turn domain errors into their status and anything else into a bare INTERNAL."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as error:  # noqa: BLE001 - this is the one place errors are mapped
                _abort(context, error)
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as error:  # noqa: BLE001
            _abort(context, error)
    return unary
