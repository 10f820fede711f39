"""`gemmalab serve`: the OpenAI-compatible HTTP server (docs/serve.md).

config.py: the limits (`ServeConfig`); schemas.py: request bodies and errors in OpenAI's shape; batcher.py: the worker
thread that decodes every running request together (continuous batching on gemmalab.inference.live), no web
framework; app.py: the FastAPI routes. FastAPI and uvicorn are an optional extra (`pip install 'gemmalab[serve]'`),
imported only when the app is asked for.
"""

from gemmalab.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve", "serving"]


def __getattr__(name: str):
    if name in ("create_app", "serve", "serving"):
        from gemmalab.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'gemmalab.serve' has no attribute {name!r}")
