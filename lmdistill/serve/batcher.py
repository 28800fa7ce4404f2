"""Request batching for a teacher that is not a local model (an API teacher served through
`lmdistill serve`), and `bench/serve.py`'s baseline ("today's server" before issue #18): requests
that arrive close together share one `teacher.iter_generate` call. A local model is served by the
continuous-batching `Engine` instead (lmdistill/serve/engine.py).

Requests wait in an asyncio queue. One background task takes the first waiting request, keeps
collecting for `wait_s` (or until `max_batch`), groups what it has by sampling settings (one
generate call takes one setting) and runs each group in a worker thread, so the event loop keeps
accepting requests meanwhile. Requests arriving during a long batch queue up and form the next one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lmdistill.teachers.base import GenerationResult, Message, SamplingParams, Teacher

log = logging.getLogger("lmdistill.serve")


class ServerShuttingDown(RuntimeError):
    """The server stopped before this request ran."""


@dataclass
class _Pending:
    messages: list[Message]
    params: SamplingParams
    future: asyncio.Future[GenerationResult] = field(repr=False)


class Batcher:
    """Runs submitted conversations on `teacher` in batches of up to `max_batch` requests."""

    def __init__(self, teacher: Teacher, *, max_batch: int = 16, wait_s: float = 0.005) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.teacher = teacher
        self.max_batch = max_batch
        self.wait_s = wait_s
        # Batches run so far (one teacher.iter_generate call each) and requests they held.
        self.batches_run = 0
        self.requests_run = 0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run_forever(), name="lmdistill-batcher")

    async def stop(self) -> None:
        """Stop taking batches and fail the requests still queued. A batch already running in the
        worker thread cannot be interrupted; its results are dropped."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue is not None and not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(ServerShuttingDown("the server is shutting down"))

    async def submit(self, messages: list[Message], params: SamplingParams) -> GenerationResult:
        """Queue one conversation and wait for its result."""
        if self._queue is None:
            raise ServerShuttingDown("the batcher is not running")
        future: asyncio.Future[GenerationResult] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(messages, params, future))
        return await future

    async def _run_forever(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect(self._queue)
            for params, group in _group_by_params(batch):
                self.batches_run += 1
                self.requests_run += len(group)
                await asyncio.to_thread(self._generate, group, params, loop)

    async def _collect(self, queue: asyncio.Queue[_Pending]) -> list[_Pending]:
        """The first waiting request plus whatever else arrives within `wait_s`, up to max_batch."""
        batch = [await queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(batch) < self.max_batch:
            if not queue.empty():  # already waiting: take it without sleeping
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        # A request whose handler was cancelled while queued no longer waits: skip its work.
        return [pending for pending in batch if not pending.future.done()]

    def _generate(
        self, group: list[_Pending], params: SamplingParams, loop: asyncio.AbstractEventLoop
    ) -> None:
        """Worker thread: run one group and hand each result to its waiting request."""
        delivered: set[int] = set()
        error: BaseException | None = None
        try:
            for result in self.teacher.iter_generate([p.messages for p in group], params):
                delivered.add(result.index)
                _call_soon(loop, _set_result, group[result.index].future, result)
        except Exception as exc:
            log.exception("generation failed for a batch of %d requests", len(group))
            error = exc
        missing = [pending for index, pending in enumerate(group) if index not in delivered]
        if missing and error is None:
            log.error(
                "the teacher returned no result for %d of %d requests", len(missing), len(group)
            )
            error = RuntimeError("the teacher returned no result for this request")
        for pending in missing:
            _call_soon(loop, _set_exception, pending.future, error)


def _group_by_params(batch: Sequence[_Pending]) -> list[tuple[SamplingParams, list[_Pending]]]:
    groups: dict[SamplingParams, list[_Pending]] = {}
    for pending in batch:
        groups.setdefault(pending.params, []).append(pending)
    return list(groups.items())


def _call_soon(loop: asyncio.AbstractEventLoop, func: Callable[..., None], *args: object) -> None:
    # The loop is closed when the server stopped while this batch ran; nobody waits any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(func, *args)


def _set_result(future: asyncio.Future[GenerationResult], result: GenerationResult) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[GenerationResult], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
