"""Errors become JSON answers a client can act on; never a 500 with a traceback."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DataError as DatabaseDataError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY
from starlette.requests import ClientDisconnect

from app.db import is_connection_error
from app.errors import DatabaseUnavailable, ServiceError

log = logging.getLogger(__name__)

RETRY_AFTER_S = "5"
# nginx's "client closed request": what the access log and telemetry see; nobody receives it
CLIENT_GONE = 499


def install_error_handlers(app: FastAPI) -> None:
    from worker.engine.errors import DataError, SpecError

    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(SpecError, _spec_error)
    app.add_exception_handler(DataError, _data_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(DatabaseDataError, _unstorable_value)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    for lost_database in (OperationalError, InterfaceError, PoolTimeout):
        app.add_exception_handler(lost_database, _database_lost)
    app.add_exception_handler(Exception, _unexpected)


def _service_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    headers = {}
    if exc.status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if exc.status_code == 503:
        headers["Retry-After"] = RETRY_AFTER_S
    return JSONResponse({"detail": str(exc)}, status_code=exc.status_code, headers=headers)


def _spec_error(_request: Request, exc: Exception) -> JSONResponse:
    issues = [issue.as_dict() for issue in exc.issues]  # type: ignore[attr-defined]
    return JSONResponse({"detail": issues}, status_code=422)


def _data_error(_request: Request, exc: Exception) -> JSONResponse:
    lines = str(exc).strip().splitlines()
    return JSONResponse({"detail": lines[0] if lines else "bad dataset"}, status_code=422)


def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": [_issue(error) for error in exc.errors()]}, status_code=422)


def _issue(error: dict[str, Any]) -> dict[str, str]:
    from worker.engine.errors import format_path

    message = str(error.get("msg", "invalid"))
    return {
        "path": format_path(part for part in error.get("loc", ()) if isinstance(part, str | int)),
        "message": message,
    }


async def _http_error(request: Request, exc: Exception) -> Any:
    assert isinstance(exc, HTTPException)
    limit = request.scope.get(MAX_BODY_SIZE_SCOPE_KEY)
    if exc.status_code == 413 and isinstance(limit, int):
        # Starlette's body limiter cut off a body sent without Content-Length: say the limit.
        detail = f"request body exceeds the limit of {limit:,} bytes"
        return JSONResponse({"detail": detail}, status_code=413)
    return await http_exception_handler(request, exc)


def _unstorable_value(_request: Request, exc: Exception) -> JSONResponse:
    # A value the database refuses (PostgreSQL: a NUL character in text, a number out of range).
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    detail = f"a value in the request cannot be stored: {lines[0] if lines else 'refused'}"
    return JSONResponse({"detail": detail}, status_code=422)


def _client_gone(request: Request, _exc: Exception) -> Response:
    # A client that hangs up mid-request (a dropped upload, a closed tab) is not our
    # error: one line at INFO, no traceback. Whatever it was sending is cleaned up by
    # the code it interrupted (temp files, transactions).
    log.info("client went away during %s %s", request.method, request.url.path)
    return Response(status_code=CLIENT_GONE)


def _database_lost(request: Request, _exc: Exception) -> JSONResponse:
    return _service_error(request, DatabaseUnavailable())


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if is_connection_error(exc):
        return _service_error(request, DatabaseUnavailable())
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        {"detail": "internal error; the server log has the details"}, status_code=500
    )
