"""HTTP API (FastAPI). ``create_app(settings, executor)`` builds it; Wiro request quirks live in ``parsing``."""
from .app import create_app

__all__ = ["create_app"]
