"""The FastAPI app behind ``eri serve``: native ``/v1`` API, A1111 ``/sdapi/v1`` surface, health, metrics.

The routes live in :mod:`~eridiffusion.serving.native` and :mod:`~eridiffusion.serving.a1111`, what they
share in :mod:`~eridiffusion.serving.server`, and auth, body limit and error rendering in
:mod:`~eridiffusion.serving.security`; this module wires them into one app.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from eridiffusion.inference.generator import Generator
from eridiffusion.serving.a1111 import a1111_router, controlnet_router
from eridiffusion.serving.a1111_compat import compat_router
from eridiffusion.serving.native import native_router
from eridiffusion.serving.security import (
    BodyLimit,
    SafeJSONResponse,
    add_private_docs,
    install_error_handlers,
    require_key,
)
from eridiffusion.serving.server import Server, ServeSettings


def create_app(generator: Generator, settings: ServeSettings | None = None) -> FastAPI:
    """The server app; ``eri serve`` runs it with uvicorn, tests with FastAPI's TestClient.

    ``generator`` must not accept paths (``allow_paths=False``, its default): every name a client sends
    resolves inside the folders it was built with."""
    server = Server(generator, settings or ServeSettings())
    public = server.settings.public_docs

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        # refuse new work at once (503), then let the worker finish what it accepted; the join runs in a
        # thread so handlers still awaiting their jobs keep being served while it waits
        server.queue.begin_shutdown()
        await asyncio.to_thread(server.queue.shutdown)

    app = FastAPI(
        title="EriDiffusion",
        version="1",
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
        docs_url="/docs" if public else None,
        redoc_url="/redoc" if public else None,
        openapi_url="/openapi.json" if public else None,
    )
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=server.settings.max_body_bytes)
    install_error_handlers(app)
    auth = [Depends(require_key(server.settings.api_key))]
    if not public:
        add_private_docs(app, auth)
    app.include_router(native_router(server), dependencies=auth)
    app.include_router(a1111_router(server), dependencies=auth)
    app.include_router(compat_router(server), dependencies=auth)
    app.include_router(controlnet_router(server), dependencies=auth)

    @app.get("/health", tags=["ops"])
    def health(response: Response) -> dict[str, Any]:
        """503 while draining for shutdown, so load balancers stop routing here."""
        status = "shutting down" if server.queue.closing else "ok"
        if server.queue.closing:
            response.status_code = 503
        return {"status": status, "models": sorted(generator.models), "queue": server.queue.waiting}

    @app.get("/metrics", tags=["ops"], dependencies=auth)
    def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
