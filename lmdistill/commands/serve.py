"""`lmdistill serve`: an OpenAI-compatible HTTP server for a local model, shaped like vLLM's.

lmdistill serve --model smollm2-135m-instruct --port 8000
curl http://127.0.0.1:8000/v1/models"""

from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a teacher over an OpenAI-compatible API",
        description=(
            "Serve a model over an OpenAI-compatible API shaped like vLLM's: POST "
            "/v1/chat/completions and /v1/completions (streaming, stop, logprobs with echo and "
            "prompt_logprobs, token ids), GET /v1/models, POST /tokenize and /detokenize, with "
            "continuous batching on CPU or one GPU. On a GPU machine for real traffic, vLLM is "
            "the engine to use: `vllm serve MODEL_DIR` serves the same API, and lmdistill's "
            "teacher and eval clients work against either."
        ),
    )
    parser.add_argument(
        "--model",
        metavar="SPEC",
        default="smollm2-135m-instruct",
        help="bundled name or Hugging Face model dir (default: %(default)s)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: loopback)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument(
        "--api-key",
        metavar="TOKEN",
        default=None,
        help="require 'Authorization: Bearer KEY' (default: $LMDISTILL_SERVE_API_KEY; none if unset)",
    )
    parser.add_argument(
        "--max-batch",
        metavar="N",
        type=int,
        default=16,
        help="most sequences (choices) decoded together (default: %(default)s)",
    )
    parser.add_argument(
        "--served-model-name",
        metavar="NAME",
        default=None,
        help="model id clients use (default: the bundled name or the model dir's name)",
    )
    parser.add_argument(
        "--allow-weight-reload",
        action="store_true",
        help='accept POST /reload_weights {"path": FILE.safetensors}: replace the served '
        "weights (a training run samples its student through this server: `on_policy.server` "
        "in a recipe). Reads any file the server can: keep the server on loopback or keyed",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmdistill.serve.server import API_KEY_ENV, serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        # The environment is the safer place for a secret: command lines show up in `ps`.
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_batch=args.max_batch,
        model_name=args.served_model_name,
        allow_weight_reload=args.allow_weight_reload,
    )
    return 0
