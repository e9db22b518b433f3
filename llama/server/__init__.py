"""An OpenAI-compatible HTTP server over the serving engine (`python -m llama.server`).

`create_app(engine, model_name, api_key=None)` is the FastAPI app; `__main__` builds the
model, starts the engine and serves the app with uvicorn (on rank 0 under torchrun).
"""

from llama.server.app import create_app

__all__ = ["create_app"]
