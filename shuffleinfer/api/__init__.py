"""OpenAI-compatible HTTP api: `create_app(backend)` builds the FastAPI app."""

from shuffleinfer.api.app import create_app

__all__ = ["create_app"]
