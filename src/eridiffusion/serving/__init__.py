"""HTTP serving: FastAPI app (native and A1111 APIs), bounded job queue, Prometheus metrics."""

from eridiffusion.serving.app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
