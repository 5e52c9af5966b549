"""What goes wrong, as exceptions a program can catch and a person can read.

Every error of this package is a `TorchyardError`. Its `issues` say where and why:
for a spec the service refused, one `Issue` per problem with its JSON path
(`model.layers[0].out_features`); `path` is the first one's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import httpx


class Issue(NamedTuple):
    path: str  # a JSON path in the spec, or query.x / header.x; "" when it is about no one place
    message: str

    def line(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class TorchyardError(Exception):
    """Base of this package's errors."""

    def __init__(self, issues: list[Issue]):
        self.issues = issues
        super().__init__("; ".join(issue.line() for issue in issues))

    @property
    def path(self) -> str | None:
        """The JSON path of the first problem, or None when it is about no one place."""
        return next((issue.path for issue in self.issues if issue.path), None)

    @property
    def lines(self) -> list[str]:
        """One line a person can act on per problem."""
        return [issue.line() for issue in self.issues]


class ApiError(TorchyardError):
    """The service answered with an error: `status` (404, 409, 422...) and its `detail`
    as sent (a string, or a list of `{"path", "message"}`)."""

    def __init__(self, status: int, detail: Any):
        self.status = status
        self.detail = detail
        super().__init__(_issues(detail))

    def __str__(self) -> str:
        return f"HTTP {self.status}: {super().__str__()}"


class Unreachable(TorchyardError):
    """The service could not be reached, or an event stream stayed down too long."""

    def __init__(self, message: str):
        super().__init__([Issue("", message)])


class LocalSpecError(TorchyardError):
    """A spec or dataset file on this machine cannot be used, found before anything is sent."""


def _issues(detail: Any) -> list[Issue]:
    if isinstance(detail, list):
        return [
            Issue(str(item.get("path") or ""), str(item["message"]))
            if isinstance(item, dict) and "message" in item
            else Issue("", str(item))
            for item in detail
        ]
    return [Issue("", str(detail))]


def raise_for_answer(response: httpx.Response) -> httpx.Response:
    """The response itself when it is not an error; else an ApiError with the server's detail.

    The body must have been read (a streamed response: `read()` / `aread()` first).
    """
    if response.status_code < 400:
        return response
    try:
        body = response.json()
        detail = body.get("detail", response.text) if isinstance(body, dict) else body
    except ValueError:
        detail = response.text or response.reason_phrase
    raise ApiError(response.status_code, detail)
