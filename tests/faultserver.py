"""A real, misbehaving OpenAI-compatible chat-completions server on 127.0.0.1, for tests and benches.

It answers `POST /v1/chat/completions` with a canned, deterministic answer, and can misbehave the
way real endpoints do: 429 with Retry-After, 500, a stall past the client's timeout, a body that is
not JSON, a dropped connection, a wrong API key, or ignoring `n`. It counts every request on the
server side, so tests can prove that a cache or a resume did not send a request again.

Run it by itself to poke at it with curl or `lmdistill generate`:

    python tests/faultserver.py --fault-rate 0.3 --port 8765
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = ("429", "500", "stall", "badjson", "drop")


@dataclass
class FaultPlan:
    """How the server misbehaves: each request is faulty with probability `fault_rate` (seeded
    RNG), and the faulty ones cycle through `faults`."""

    fault_rate: float = 0.0  # fraction of requests that get one of `faults`
    faults: tuple[str, ...] = FAULTS
    always: str | None = None  # every request gets this fault (e.g. "500", "429", "drop")
    latency_s: float = 0.0  # added to every answered request
    stall_s: float = 5.0  # how long a "stall" holds the request before giving up on it
    retry_after: str | None = "0"  # Retry-After header sent with 429 (None: no header)
    api_key: str | None = None  # when set, any other bearer token gets 401
    max_choices: int | None = None  # answer at most this many choices (a server that ignores n)
    answer: str | None = None  # fixed answer text; default: derived from the prompt
    # The answer to a conversation (its messages), in place of `answer`: a teacher with a
    # behaviour, e.g. one that calls tools (tests/toolserver.py).
    reply: Callable[[list[dict[str, Any]]], str] | None = None
    ok_first: int = 0  # the first this many requests are answered whatever the faults
    seed: int = 0


@dataclass
class RequestLog:
    """What the server saw and did for one request."""

    time: float
    outcome: str  # "ok" or the fault name, or "401"
    prompt: str  # content of the last message
    n: int
    body: dict[str, Any] = field(repr=False, default_factory=dict)
    authorization: str = field(repr=False, default="")


class _HTTPServer(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: a burst of 16 new connections overflows it, and
    # the dropped SYNs are retried after 1 s, which would look like slow concurrency.
    request_queue_size = 128


def answer_text(
    prompt: str, choice: int, plan: FaultPlan, messages: list[dict[str, Any]] | None = None
) -> str:
    """The canned answer: deterministic, so tests can check which prompt it belongs to."""
    if plan.reply is not None:
        return plan.reply(messages or [{"role": "user", "content": prompt}])
    if plan.answer is not None:
        return plan.answer
    return f"answer {choice} to: {prompt}"


class FaultServer:
    """Serve `plan` on 127.0.0.1 from a background thread. Use as a context manager."""

    def __init__(self, plan: FaultPlan | None = None, *, port: int = 0) -> None:
        self.plan = plan or FaultPlan()
        self.log: list[RequestLog] = []
        self._lock = threading.Lock()
        self._rng = random.Random(self.plan.seed)
        self._closing = threading.Event()
        self._in_flight = 0
        self._faults_fired = 0
        self.max_in_flight = 0  # most requests being handled at once
        self._httpd = _HTTPServer(("127.0.0.1", port), _make_handler(self))
        self._httpd.daemon_threads = True  # a stalled handler must not block shutdown
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FaultServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what tests read -------------------------------------------------------------------

    def outcomes(self) -> Counter[str]:
        with self._lock:
            return Counter(r.outcome for r in self.log)

    def answered_prompts(self) -> Counter[str]:
        """How many successful answers each prompt got (each is a request someone paid for)."""
        with self._lock:
            return Counter(r.prompt for r in self.log if r.outcome == "ok")

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.log)

    # --- what the handler calls ------------------------------------------------------------

    def _admit(self, body: dict[str, Any], authorization: str) -> str:
        """Decide what this request gets, and log it (one lock: counts stay exact under load)."""
        plan = self.plan
        messages = body.get("messages") or [{"content": ""}]
        with self._lock:
            if plan.api_key is not None and authorization != f"Bearer {plan.api_key}":
                outcome = "401"
            elif len(self.log) < plan.ok_first:
                outcome = "ok"
            elif plan.always:
                outcome = plan.always
            elif self._rng.random() < plan.fault_rate:
                # Kinds take turns, so a run with a handful of faults meets every kind.
                outcome = plan.faults[self._faults_fired % len(plan.faults)]
                self._faults_fired += 1
            else:
                outcome = "ok"
            self.log.append(
                RequestLog(
                    time=time.monotonic(),
                    outcome=outcome,
                    prompt=str(messages[-1].get("content", "")),
                    n=int(body.get("n") or 1),
                    body=body,
                    authorization=authorization,
                )
            )
        return outcome

    @contextlib.contextmanager
    def _handling(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1


def _completion(body: dict[str, Any], plan: FaultPlan) -> dict[str, Any]:
    messages = body.get("messages") or [{"content": ""}]
    prompt = str(messages[-1].get("content", ""))
    n = int(body.get("n") or 1)
    if plan.max_choices is not None:
        n = min(n, plan.max_choices)
    max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 256)
    top_k = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
    choices = []
    completion_tokens = 0
    for i in range(n):
        words = answer_text(prompt, i, plan, messages).split(" ")
        finish = "stop" if len(words) <= max_tokens else "length"
        words = words[:max_tokens]
        completion_tokens += len(words)
        choice: dict[str, Any] = {
            "index": i,
            "message": {"role": "assistant", "content": " ".join(words)},
            "finish_reason": finish,
            "logprobs": None,
        }
        if body.get("logprobs"):
            choice["logprobs"] = {
                "content": [
                    {
                        "token": w,
                        "logprob": -0.1,
                        "top_logprobs": [
                            {"token": w if j == 0 else f"alt{j}", "logprob": -0.1 * (j + 1)}
                            for j in range(top_k)
                        ],
                    }
                    for w in words
                ]
            }
        choices.append(choice)
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
    return {
        "id": "chatcmpl-fault",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "fault"),
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _make_handler(server: FaultServer) -> type[BaseHTTPRequestHandler]:
    plan = server.plan

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like real servers; the client pools connections
        # Headers and body go out as separate small writes; with Nagle on, the second waits for
        # the client's delayed ACK (~40 ms per request on Linux).
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)

        def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
            payload = json.dumps({"error": {"message": message, "type": "fault"}}).encode()
            self._send(status, payload, headers)

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, json.dumps({"object": "list", "data": [{"id": "fault"}]}).encode())
            else:
                self._error(404, "not found")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._error(404, f"no route {self.path}")
                return
            body = json.loads(raw or b"{}")
            outcome = server._admit(body, self.headers.get("Authorization", ""))
            # A broken pipe means the client gave up (a stall past its timeout): that is the point.
            with server._handling(), contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._respond(outcome, body)

        def _respond(self, outcome: str, body: dict[str, Any]) -> None:
            if outcome == "401":
                # Real servers echo part of the key back; the client must never print it.
                self._error(401, f"Incorrect API key provided: {self.headers.get('Authorization')}")
            elif outcome == "429":
                headers = {"Retry-After": plan.retry_after} if plan.retry_after is not None else {}
                self._error(429, "rate limited", headers)
            elif outcome == "500":
                self._error(500, "internal error")
            elif outcome == "stall":
                server._closing.wait(plan.stall_s)
                self._error(504, "stalled")
            elif outcome == "badjson":
                self._send(200, b'{"id": "chatcmpl-fault", "choices": [{"mess')
            elif outcome == "drop":
                self.close_connection = True
                self.connection.close()
            else:
                if plan.latency_s:
                    time.sleep(plan.latency_s)
                self._send(200, json.dumps(_completion(body, plan)).encode())

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--always", choices=FAULTS, default=None)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    plan = FaultPlan(
        fault_rate=args.fault_rate, always=args.always, latency_s=args.latency, api_key=args.api_key
    )
    with FaultServer(plan, port=args.port) as server:
        print(f"serving on {server.base_url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
