"""HTTP serving: `create_app` builds the FastAPI app (API and playground), `serve` runs it."""

from .app import ServeLimits, create_app, serve

__all__ = ["ServeLimits", "create_app", "serve"]
