"""The dashboard's files (app/web/), served by the API at `/` with their security headers.

The page is static: it signs in through POST /api/v1/session and then reads and
writes through the same REST API as every other client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

WEB_DIR = Path(__file__).resolve().parent / "web"
ASSETS = "/web"

# No inline script or style, nothing from another origin; the page is not framed.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


def mount_web(app: FastAPI) -> None:
    """`/` answers the page; `/web/...` its modules, styles and vendored libraries."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        # no-cache: a new release's page is picked up at once (its files revalidate by ETag)
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount(ASSETS, StaticFiles(directory=WEB_DIR), name="web")
    app.add_middleware(PageHeaders)


class PageHeaders:
    """Adds the security headers (CSP above) to the page and its files; the API's
    answers and /docs (which loads Swagger UI from a CDN) are left as they are."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else None
        if path is None or not (path == "/" or path.startswith(ASSETS + "/")):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)
