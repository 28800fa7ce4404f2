"""Run the OpenAI-compatible app: in the foreground for `lmdistill serve`, or in a background
thread on loopback for tests and for pipelines that want a local endpoint."""

from __future__ import annotations

import ipaddress
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI

from lmdistill.errors import UserError

API_KEY_ENV = "LMDISTILL_SERVE_API_KEY"


def serve(
    spec: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 16,
    model_name: str | None = None,
    allow_weight_reload: bool = False,
) -> None:
    """Load teacher `spec` and serve it until SIGINT/SIGTERM (uvicorn then stops accepting,
    finishes the requests in flight, and returns)."""
    import uvicorn

    from lmdistill.serve.app import create_app
    from lmdistill.teachers.registry import is_api_spec, load_teacher

    if max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {max_batch}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {port}")
    # A local model batches on the GPU/CPU; an API teacher has its own concurrency setting.
    teacher = load_teacher(spec) if is_api_spec(spec) else load_teacher(spec, batch_size=max_batch)
    try:
        app = create_app(
            teacher,
            api_key=api_key,
            model_name=model_name,
            max_batch=max_batch,
            allow_weight_reload=allow_weight_reload,
        )
        keyed = "a bearer API key required" if api_key else "no API key"
        print(
            f"lmdistill serve: model '{app.state.model_id}' at http://{_url_host(host)}:{port}/v1 "
            f"({keyed}); Ctrl-C stops",
            file=sys.stderr,
        )
        if _has_gpu():
            print(
                "lmdistill serve: a GPU is present; for throughput serve the model dir with vLLM "
                "(`vllm serve MODEL_DIR`): the same API, and lmdistill's clients work with both",
                file=sys.stderr,
            )
        if not api_key and not _is_loopback(host):
            print(
                f"lmdistill serve: warning: listening on {host} without an API key; anyone who "
                f"can reach this port can use the model (set {API_KEY_ENV} or --api-key)",
                file=sys.stderr,
            )
        # uvicorn installs SIGINT/SIGTERM handlers that shut down gracefully; the access log
        # records method, path and status only, never headers, so the key is not logged.
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        teacher.close()


@contextmanager
def running_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"
) -> Iterator[str]:
    """Serve `app` from a background thread; yields the base URL (`http://host:port/v1`).

    port 0 picks a free port. The server stops when the block exits."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn only installs signal handlers in the main thread, so this thread leaves them alone.
    thread = threading.Thread(target=server.run, name="lmdistill-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{_url_host(host)}:{bound_port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
