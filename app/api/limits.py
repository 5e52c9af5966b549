"""Request body limits per route: uploads get max_upload_bytes, specs max_spec_bytes.

A declared Content-Length over the limit is refused before any byte is read;
a body that grows past it while streaming is cut off by Starlette's limiter.
"""

from __future__ import annotations

import re

from starlette.datastructures import Headers
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.config import Settings

MULTIPART_OVERHEAD = 64 * 1024
WORKER_REPORT_LIMIT = 64 << 20


class BodyLimits:
    def __init__(self, app: ASGIApp, settings: Settings, prefix: str):
        self.app = app
        p = re.escape(prefix)
        self.rules: list[tuple[str, re.Pattern[str], int | None]] = [
            (
                "POST",
                re.compile(rf"{p}/datasets/?"),
                settings.max_upload_bytes + MULTIPART_OVERHEAD,
            ),
            # checkpoints are as large as the models the service allows; the worker is trusted
            ("PUT", re.compile(rf"{p}/worker/jobs/[^/]+/checkpoints/.+"), None),
            ("POST", re.compile(rf"{p}/worker/jobs/[^/]+/(metrics|logs)"), WORKER_REPORT_LIMIT),
        ]
        self.default = settings.max_spec_bytes

    def limit_for(self, method: str, path: str) -> int | None:
        for rule_method, pattern, limit in self.rules:
            if method == rule_method and pattern.fullmatch(path):
                return limit
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            detail = f"request body of {int(declared):,} bytes exceeds the limit of {limit:,} bytes"
            await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
            return
        await RequestBodyLimitMiddleware(self.app, limit)(scope, receive, send)
