"""Domain errors. They carry no transport types: the gRPC edge (server/status.py) maps each to a status."""
from __future__ import annotations


class RecsysError(Exception):
    """Base for errors whose message is safe to show to callers."""


class InvalidRequest(RecsysError):
    """A request field breaks a documented limit; the message names the field."""


class ModelsUnavailable(RecsysError):
    """No model can answer right now (not loaded yet, backend down); retrying may help."""


class BackendMisconfigured(RecsysError):
    """The backend answers but lacks the model, version or signature we were told to use."""


class DeadlineExceeded(RecsysError):
    """The caller's deadline passed before the answer was complete."""


class Cancelled(RecsysError):
    """The caller went away."""


class Overloaded(RecsysError):
    """Too much work in flight (here or in the backend); retry later or elsewhere."""


class StoreUnavailable(RecsysError):
    """The interaction store cannot be reached or failed; retrying may help."""


class NotConfigured(RecsysError):
    """The call needs something this server was started without (e.g. an interaction store)."""


class NotFound(RecsysError):
    """The request names something the models do not know (SimilarItems' movie)."""


class Unauthenticated(RecsysError):
    """The call carries no valid credential."""


class PermissionDenied(RecsysError):
    """The credential is valid but does not allow this call (its scope, or another user's data)."""
