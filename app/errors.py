"""Domain errors: raised by the store and services, turned into HTTP answers in one place.

The store never speaks HTTP; `app.api.errors` maps each class to a status code.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of errors a client can act on; `str(exc)` is the one-line detail."""

    status_code = 400


class NotFound(ServiceError):
    """The thing does not exist, or belongs to someone else (the two look the same)."""

    status_code = 404


class Conflict(ServiceError):
    """The request does not fit the current state (job not queued, dataset in use)."""

    status_code = 409


class StaleAttempt(Conflict):
    """A worker's attempt token is no longer the job's current attempt."""

    def __init__(self) -> None:
        super().__init__("stale attempt")


class Unauthorized(ServiceError):
    status_code = 401


class Forbidden(ServiceError):
    """Known caller, refused: a cookie request without its CSRF token."""

    status_code = 403


class BadRequest(ServiceError):
    status_code = 400


class TooLarge(ServiceError):
    status_code = 413


class Unprocessable(ServiceError):
    """Well-formed but unusable input: a dataset file that cannot be read, an export that fails."""

    status_code = 422


class DatabaseUnavailable(ServiceError):
    """The database cannot be reached; the client should retry later."""

    status_code = 503

    def __init__(self, detail: str = "database unavailable, retry later") -> None:
        super().__init__(detail)
