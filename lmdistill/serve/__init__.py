"""An OpenAI-compatible server for a local teacher (`lmdistill serve`)."""

from lmdistill.serve.app import create_app
from lmdistill.serve.server import running_server, serve

__all__ = ["create_app", "running_server", "serve"]
