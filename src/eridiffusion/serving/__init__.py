"""HTTP serving: FastAPI app (native and A1111 APIs), bounded job queue, Prometheus metrics."""

from eridiffusion.serving.app import create_app
from eridiffusion.serving.server import ServeSettings

__all__ = ["ServeSettings", "create_app"]
