"""A teacher behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp,
`lmdistill serve`, ...), through the official `openai` client.

The retry policy is ours, not the client's (the client runs with `max_retries=0`), so it is the same
for every endpoint and testable: exponential backoff with full jitter on 429, 5xx, timeouts,
connection errors and bodies that are not JSON, honouring the server's Retry-After; after
`max_retries` retries the request becomes a `Failure`. A rejected API key (401/403) or a wrong URL
or model (404) stops the run at once with a `UserError`: every other request would fail the same way.

The API key is read from an environment variable and kept private: it never appears in a name,
repr, message, record or log (server error bodies, which sometimes echo it, are redacted)."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lmdistill.errors import UserError
from lmdistill.teachers.base import (
    Capability,
    Failure,
    Generation,
    GenerationResult,
    Message,
    SamplingParams,
    Teacher,
)

OPENAI_BASE_URL = "https://api.openai.com/v1"
# Sent when the named key variable is unset and the endpoint is not OpenAI's: local servers
# (vLLM, llama.cpp, `lmdistill serve`) accept any key, but the client insists on one.
_PLACEHOLDER_KEY = "no-key"


class TeacherAuthError(UserError):
    """The server rejected the API key. Retrying cannot help, so the whole run stops."""


@dataclass(frozen=True)
class RetryPolicy:
    """How many times, and how long to wait, before giving up on a request.

    Waits follow "full jitter" (Brooker, "Exponential Backoff And Jitter", AWS Architecture Blog,
    2015): uniform in [0, min(max_delay_s, base_delay_s * 2**retry)], which spreads the retries of
    many concurrent requests instead of sending them back in lockstep. A server's Retry-After wins
    when it sends one (capped at max_delay_s, so a bad header cannot park a run for hours)."""

    max_retries: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise UserError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise UserError("retry delays must be >= 0")

    def delay(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (0 for the first retry)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay_s)
        return rng.uniform(0.0, min(self.max_delay_s, self.base_delay_s * 2**retry))


def parse_retry_after(headers: Any, now: datetime | None = None) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, or `Retry-After` as seconds or as an
    HTTP date (RFC 9110 section 10.2.3). None when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


def public_url(url: str) -> str:
    """The URL without user:password@, so it can be shown and saved."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


class _BadResponse(Exception):
    """A 2xx answer we cannot use (not JSON, no choices). Retried: it is usually a torn proxy body."""


class OpenAITeacher(Teacher):
    """Generate with a model behind an OpenAI-compatible `/chat/completions` endpoint.

    model: the model name the server expects. base_url: the endpoint (".../v1"); default
    `$OPENAI_BASE_URL`, else OpenAI's. api_key_env: the environment variable holding the key (a local
    server without auth works with it unset). concurrency: requests in flight at once.
    max_retries / retry_base_delay_s / timeout_s: see `RetryPolicy`; timeout_s bounds one request.
    logprobs: declare TOPK_LOGPROBS (the endpoint must return `logprobs`; OpenAI and vLLM do).
    jitter_seed: seeds the backoff jitter (not the sampling; that is `SamplingParams.seed`).

    On failure a `GenerationResult` carries the `Failure` and, when some of the n samples did
    complete (n fell back to separate requests), those generations too, so none is paid twice."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 16,
        max_retries: int = 6,
        timeout_s: float = 60.0,
        retry_base_delay_s: float = 0.5,
        logprobs: bool = False,
        jitter_seed: int | None = None,
    ) -> None:
        if not model:
            raise UserError("an API teacher needs a model name, e.g. openai:gpt-4o-mini")
        if concurrency < 1:
            raise UserError(f"concurrency must be >= 1, got {concurrency}")
        if timeout_s <= 0:
            raise UserError(f"timeout must be > 0 seconds, got {timeout_s}")
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip(
            "/"
        )
        if urlsplit(self.base_url).scheme not in ("http", "https"):
            raise UserError(f"base URL must start with http:// or https://, got '{self.base_url}'")
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retry = RetryPolicy(max_retries=max_retries, base_delay_s=retry_base_delay_s)
        self.is_openai = urlsplit(self.base_url).hostname == "api.openai.com"
        key = os.environ.get(api_key_env) or None
        if key is None and self.is_openai:
            raise UserError(
                f"set ${api_key_env} to your OpenAI API key (it is read from there only)"
            )
        self._api_key = key  # private: never formatted into anything
        self.name = f"openai:{model}@{public_url(self.base_url)}"
        self.capabilities = Capability.TEXT | (
            Capability.TOPK_LOGPROBS if logprobs else Capability(0)
        )
        self._rng = random.Random(jitter_seed)  # backoff jitter only; seeded in tests
        # Learned on the first short answer: this server ignores `n`, so ask n times for one choice.
        self._n_supported = True

    def cache_identity(self) -> str:
        # The served model name at this endpoint: what the API promises stays the same model.
        return f"openai-chat:{self.model}@{public_url(self.base_url)}"

    def __repr__(self) -> str:
        return f"OpenAITeacher({self.name!r}, concurrency={self.concurrency})"

    # --- the Teacher interface ------------------------------------------------------------

    def iter_generate(
        self, conversations: Sequence[list[Message]], params: SamplingParams
    ) -> Iterator[GenerationResult]:
        """Run the requests on an event loop in a background thread; yield results as they finish.
        Closing the iterator early (or an exception in the caller) cancels what is in flight."""
        if params.top_logprobs > 0:
            self.require(Capability.TOPK_LOGPROBS, "top-k log-probs")
        if not conversations:
            return
        results: queue.Queue[GenerationResult | _Done] = queue.Queue()
        runner = _LoopThread(
            lambda: self._generate_all(conversations, params, results.put),
            on_exit=lambda: results.put(_Done()),
        )
        runner.start()
        try:
            while True:
                item = results.get()
                if isinstance(item, _Done):
                    break
                yield item
            runner.join()
            if runner.error is not None:
                raise runner.error
        finally:
            runner.cancel()

    # --- async core ------------------------------------------------------------------------

    async def _generate_all(
        self,
        conversations: Sequence[list[Message]],
        params: SamplingParams,
        emit: Callable[[GenerationResult], None],
    ) -> None:
        import openai  # imported here: `lmdistill --help` must not pay for it

        client = openai.AsyncOpenAI(
            api_key=self._api_key or _PLACEHOLDER_KEY,
            base_url=self.base_url,
            max_retries=0,  # the retry policy is ours (see RetryPolicy)
            timeout=self.timeout_s,
        )
        semaphore = asyncio.Semaphore(self.concurrency)
        # Workers pull from one shared iterator instead of one task per prompt, so a million
        # prompts cost `concurrency` tasks, not a million.
        indices = iter(range(len(conversations)))

        async def worker() -> None:
            for index in indices:
                result = await self._generate_one(
                    client, semaphore, index, conversations[index], params
                )
                emit(result)

        workers = [
            asyncio.create_task(worker()) for _ in range(min(self.concurrency, len(conversations)))
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await client.close()

    async def _generate_one(
        self,
        client: Any,
        semaphore: asyncio.Semaphore,
        index: int,
        messages: list[Message],
        params: SamplingParams,
    ) -> GenerationResult:
        """All n samples for one conversation: one request with `n`, then single-choice requests
        for whatever a server that ignores `n` did not return."""
        first_n = params.n if self._n_supported else 1
        first = await self._request(client, semaphore, messages, params, first_n, params.seed)
        if isinstance(first, Failure):
            return GenerationResult(index=index, failure=first)
        generations = first[: params.n]
        if len(first) < first_n:
            self._n_supported = False
        missing = params.n - len(generations)
        if missing > 0:
            # Distinct seeds, or a seeded server would return the same sample n times.
            seeds = [
                None if params.seed is None else params.seed + len(generations) + j
                for j in range(missing)
            ]
            extra = await asyncio.gather(
                *(self._request(client, semaphore, messages, params, 1, s) for s in seeds)
            )
            failures = [o for o in extra if isinstance(o, Failure)]
            generations += [o[0] for o in extra if not isinstance(o, Failure)]
            if failures:  # keep the samples that did complete: they were paid for
                return GenerationResult(index, generations=generations, failure=failures[0])
        return GenerationResult(index=index, generations=generations)

    async def _request(
        self,
        client: Any,
        semaphore: asyncio.Semaphore,
        messages: list[Message],
        params: SamplingParams,
        n: int,
        seed: int | None,
    ) -> list[Generation] | Failure:
        """One chat-completions request, retried per `self.retry`."""
        import openai

        kwargs = self._request_kwargs(messages, params, n, seed)
        attempts = 0
        while True:
            attempts += 1
            retry_after: float | None = None
            try:
                async with semaphore:  # held only while the request is on the wire, not in backoff
                    start = time.monotonic()
                    raw = await client.chat.completions.with_raw_response.create(**kwargs)
                    latency = time.monotonic() - start
                    return self._parse(raw.content, n, params.top_logprobs, latency)
            except openai.APIStatusError as exc:
                status = exc.status_code
                self._raise_if_fatal(status, exc)
                if status == 429:
                    reason, retry_after = "rate_limited", parse_retry_after(exc.response.headers)
                elif status >= 500 or status in (408, 409):
                    reason, retry_after = "server_error", parse_retry_after(exc.response.headers)
                else:  # 400, 413, 422...: this request is wrong; sending it again will not help
                    return Failure("bad_request", self._redact(exc.message), attempts)
                detail = exc.message
            except openai.APITimeoutError:
                reason, detail = "timeout", f"no answer within {self.timeout_s:g}s"
            except openai.APIConnectionError as exc:
                cause = exc.__cause__
                reason, detail = "connection", f"{exc.message} ({cause or 'no detail'})"
            except (_BadResponse, openai.APIError) as exc:
                reason, detail = "bad_response", str(exc)
            if attempts > self.retry.max_retries:
                return Failure(reason, self._redact(detail), attempts)
            await asyncio.sleep(self.retry.delay(attempts - 1, retry_after, self._rng))

    def _request_kwargs(
        self, messages: list[Message], params: SamplingParams, n: int, seed: int | None
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": n,
        }
        # OpenAI deprecated max_tokens (its reasoning models refuse it); most compatible servers
        # only know max_tokens.
        kwargs["max_completion_tokens" if self.is_openai else "max_tokens"] = params.max_tokens
        if seed is not None:
            kwargs["seed"] = seed
        if params.top_logprobs > 0:
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = params.top_logprobs
        return kwargs

    def _raise_if_fatal(self, status: int, exc: Exception) -> None:
        """Errors that every request would hit: stop the run with a message the user can act on.
        The server's own message is left out for auth errors: servers echo the key back in it."""
        where = public_url(self.base_url)
        if status in (401, 403):
            unset = "" if self._api_key else f"; ${self.api_key_env} is not set"
            raise TeacherAuthError(
                f"the server at {where} rejected the API key (HTTP {status}){unset}: "
                f"put a valid key in ${self.api_key_env}, or name another variable with --api-key-env"
            )
        if status == 404:
            raise UserError(
                f"the server at {where} has no chat completions for model '{self.model}' "
                f"(HTTP 404: {self._redact(str(exc))}); check the model name and that the base URL "
                "ends in /v1"
            )

    def _parse(self, body: bytes, n: int, top_logprobs: int, latency: float) -> list[Generation]:
        """The choices of a chat-completion body, in index order."""
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _BadResponse(f"body is not JSON: {exc}") from None
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            raise _BadResponse("answer has no choices")
        usage = data.get("usage") or {}
        prompt_tokens = _int(usage.get("prompt_tokens"))
        completion_total = _int(usage.get("completion_tokens"))
        choices = sorted(choices, key=lambda c: _int(c.get("index")) if isinstance(c, dict) else 0)
        generations = []
        for i, choice in enumerate(choices[:n]):
            message = choice.get("message") if isinstance(choice, dict) else None
            if not isinstance(message, dict):
                raise _BadResponse(f"choice {i} has no message")
            text = message.get("content")
            if text is not None and not isinstance(text, str):
                raise _BadResponse(f"choice {i} content is not text")
            found = _logprobs(choice.get("logprobs")) if top_logprobs > 0 else None
            if top_logprobs > 0 and found is None:
                raise UserError(
                    f"the server at {public_url(self.base_url)} returned no logprobs; "
                    "it cannot be used for top-k log-prob distillation"
                )
            top, chosen = found or (None, None)
            # Usage covers all choices together. Per-choice counts exist only with logprobs; else
            # split the total so that the records still add up to what was billed.
            share = completion_total // len(choices) + (i < completion_total % len(choices))
            generations.append(
                Generation(
                    text=text or "",
                    finish_reason=str(choice.get("finish_reason") or "stop"),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=len(top) if top is not None else share,
                    latency_s=latency,
                    top_logprobs=top,
                    token_logprobs=chosen,
                )
            )
        return generations

    def _redact(self, text: str) -> str:
        if self._api_key and len(self._api_key) >= 4:
            text = text.replace(self._api_key, "***")
        return text


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _logprobs(
    logprobs: Any,
) -> tuple[list[list[tuple[str, float]]], list[tuple[str, float]]] | None:
    """OpenAI's `choice.logprobs.content`: per generated token, the top (token, logprob) pairs
    (best first) and the sampled token's own (token, logprob). None when the choice has none."""
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("content"), list):
        return None
    top, chosen = [], []
    for position in logprobs["content"]:
        pairs = [(str(t["token"]), float(t["logprob"])) for t in position.get("top_logprobs") or []]
        top.append(sorted(pairs, key=lambda p: -p[1]))
        chosen.append((str(position.get("token", "")), float(position.get("logprob", 0.0))))
    return top, chosen


class _Done:
    """End-of-results marker on the queue."""


class _LoopThread:
    """Runs one coroutine on its own event loop in a daemon thread, so the synchronous
    `iter_generate` can stream its results; `cancel` stops it from the calling thread.
    `on_exit` runs in the thread when the coroutine ends, however it ends."""

    def __init__(self, make_coro: Callable[[], Any], on_exit: Callable[[], None]) -> None:
        self._make_coro = make_coro
        self._on_exit = on_exit
        self._thread = threading.Thread(target=self._run, name="openai-teacher", daemon=True)
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()
        self._started.wait()  # so that cancel() always finds the task

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
            self._started.set()
            await self._make_coro()

        try:
            asyncio.run(main())
        except asyncio.CancelledError:
            pass
        except BaseException as exc:  # handed to the caller's thread and re-raised there
            self.error = exc
        finally:
            self._started.set()
            self._on_exit()

    def join(self) -> None:
        self._thread.join()

    def cancel(self) -> None:
        """Cancel the coroutine (its cleanup still runs) and wait for the thread to end."""
        if self._loop is not None and self._task is not None and self._thread.is_alive():
            # RuntimeError: the loop closed between the check and the call; nothing to cancel.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join()
