"""The server's dynamic batcher, driven directly on an event loop with a fake teacher."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence

import pytest

from lmdistill.serve.batcher import Batcher, ServerShuttingDown
from lmdistill.teachers.base import (
    Capability,
    Generation,
    GenerationResult,
    Message,
    SamplingParams,
    Teacher,
)


class EchoTeacher(Teacher):
    """Answers each conversation with its last message, in reverse order, recording batch sizes."""

    name = "echo"
    capabilities = Capability.TEXT

    def __init__(
        self, fail: bool = False, drop_last: bool = False, gate: threading.Event | None = None
    ) -> None:
        self.batches: list[int] = []
        self.fail = fail
        self.drop_last = drop_last
        self.gate = gate  # when set, each batch waits for it: a batch that takes a while

    def iter_generate(
        self, conversations: Sequence[list[Message]], params: SamplingParams
    ) -> Iterator[GenerationResult]:
        self.batches.append(len(conversations))
        if self.gate is not None:
            self.gate.wait(timeout=10)
        if self.fail:
            raise RuntimeError("out of memory")
        indices = list(reversed(range(len(conversations))))
        if self.drop_last:
            indices = indices[:-1]
        for i in indices:
            text = conversations[i][-1]["content"]
            yield GenerationResult(i, [Generation(text, "stop", 1, 1, 0.0)])


def ask(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


async def _submit_all(
    batcher: Batcher, texts: list[str], params: list[SamplingParams] | None = None
) -> list[GenerationResult | BaseException]:
    await batcher.start()
    try:
        params = params or [SamplingParams()] * len(texts)
        jobs = [batcher.submit(ask(t), p) for t, p in zip(texts, params, strict=True)]
        return await asyncio.gather(*jobs, return_exceptions=True)
    finally:
        await batcher.stop()


def test_requests_arriving_together_share_a_batch_and_get_their_own_answer() -> None:
    teacher = EchoTeacher()
    batcher = Batcher(teacher, max_batch=16, wait_s=0.05)
    texts = [f"q{i}" for i in range(6)]
    results = asyncio.run(_submit_all(batcher, texts))
    assert [r.generations[0].text for r in results] == texts  # routed back despite reverse order
    assert teacher.batches == [6]
    assert (batcher.batches_run, batcher.requests_run) == (1, 6)


def test_max_batch_caps_a_batch() -> None:
    teacher = EchoTeacher()
    asyncio.run(_submit_all(Batcher(teacher, max_batch=2, wait_s=0.05), ["a", "b", "c", "d", "e"]))
    assert teacher.batches == [2, 2, 1]


def test_different_sampling_settings_run_as_separate_groups() -> None:
    teacher = EchoTeacher()
    greedy, hot = SamplingParams(temperature=0), SamplingParams(temperature=1.0)
    results = asyncio.run(
        _submit_all(Batcher(teacher, wait_s=0.05), ["a", "b", "c"], [greedy, hot, greedy])
    )
    assert [r.generations[0].text for r in results] == ["a", "b", "c"]
    assert sorted(teacher.batches) == [1, 2]


def test_a_failing_batch_fails_each_of_its_requests() -> None:
    results = asyncio.run(_submit_all(Batcher(EchoTeacher(fail=True), wait_s=0.05), ["a", "b"]))
    assert all(isinstance(r, RuntimeError) and "out of memory" in str(r) for r in results)


def test_a_missing_result_is_an_error_not_a_hang() -> None:
    results = asyncio.run(
        _submit_all(Batcher(EchoTeacher(drop_last=True), wait_s=0.05), ["a", "b"])
    )
    # The teacher answers in reverse order and drops its last answer, i.e. request 0's.
    assert isinstance(results[0], RuntimeError) and "no result" in str(results[0])
    assert results[1].generations[0].text == "b"


def test_stop_fails_queued_requests_and_lets_the_running_batch_finish() -> None:
    release = threading.Event()
    teacher = EchoTeacher(gate=release)

    async def scenario() -> list[GenerationResult | BaseException]:
        batcher = Batcher(teacher, wait_s=0.0)
        await batcher.start()
        running = asyncio.create_task(batcher.submit(ask("a"), SamplingParams()))
        await asyncio.sleep(0.05)  # "a" is now generating in the worker thread
        queued = asyncio.create_task(batcher.submit(ask("b"), SamplingParams()))
        await asyncio.sleep(0.01)
        await batcher.stop()
        release.set()
        return await asyncio.gather(running, queued, return_exceptions=True)

    running, queued = asyncio.run(scenario())
    assert isinstance(running, GenerationResult) and running.generations[0].text == "a"
    assert isinstance(queued, ServerShuttingDown)


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(EchoTeacher(), max_batch=0)
