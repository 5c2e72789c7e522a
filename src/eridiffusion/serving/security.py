"""What stands between a client and the server's disk, memory and tracebacks.

- **Auth**: with an API key every route but ``/health`` needs it, the API docs too unless
  ``--public-docs``; the key goes as ``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or as the password
  of HTTP Basic auth (what A1111 clients send for ``--api-auth user:pass``). The Basic user name is
  ignored: there is one key, not accounts.
- **Body size**: a body longer than ``max_body_bytes`` answers 413 before it is read in full.
- **Answers**: JSON is written ASCII-escaped and without NaN, and validation errors list field, message
  and type but never the input (which could be 20 MB of junk, or a value JSON cannot carry), so no bad
  input turns into a 500 on the way out.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.params import Depends
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CHALLENGE = 'Basic realm="eri serve", Bearer'
"""Basic first, so a browser opening /docs asks for the key (as the password)."""


class SafeJSONResponse(JSONResponse):
    """JSON that any bytes-level client can read: ASCII-escaped (a lone surrogate a client sent cannot
    break the encoding) and strict about NaN (answers are built from validated, finite values)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def require_key(api_key: str | None) -> Any:
    """A dependency that answers 401 unless the request carries ``api_key`` (see the module doc)."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = request.headers.get("x-api-key")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            token = value
        elif scheme.lower() == "basic":
            try:
                token = base64.b64decode(value, validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                token = None
        if token is None or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise HTTPException(
                401, detail="missing or wrong API key", headers={"WWW-Authenticate": CHALLENGE}
            )

    return check


class BodyLimit:
    """ASGI middleware: a body declared (Content-Length) or streamed beyond ``max_bytes`` answers 413; the
    app never sees more than ``max_bytes`` of it. A streamed body that passes the limit gets its 413 at
    once; the app is then told the client left, and whatever it answers is dropped."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen, started, refused = 0, False, False

        async def counted() -> Message:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes and not started:
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted, tracked)

    async def _refuse(self, send: Send) -> None:
        detail = f"request body larger than the limit of {self.max_bytes} bytes"
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _validation_error(_request: Request, exc: Exception) -> SafeJSONResponse:
    assert isinstance(exc, RequestValidationError)
    detail = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]
    return SafeJSONResponse({"detail": detail}, status_code=422)


def _http_error(_request: Request, exc: Exception) -> SafeJSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return SafeJSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Validation (422) and HTTP errors rendered with :class:`SafeJSONResponse`."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


def add_private_docs(app: FastAPI, auth: list[Depends]) -> None:
    """/openapi.json, /docs and /redoc behind the API key (the app is built with its own docs off)."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
    def openapi() -> SafeJSONResponse:
        return SafeJSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=auth)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", include_in_schema=False, dependencies=auth)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")
