"""The continuous-batching engine, driven directly on an event loop with a tiny model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from lmdistill.serve.engine import Delta, Engine, Prompt
from lmdistill.serve.sampling import SamplingOptions
from lmdistill.teachers.local import HFTeacher


@pytest.fixture(scope="module")
def teacher(tiny_model_dir: Path) -> HFTeacher:
    return HFTeacher(tiny_model_dir)


def make_engine(teacher: HFTeacher, max_batch: int = 8) -> Engine:
    return Engine(teacher.model, teacher.tokenizer, teacher.eos_ids, max_batch=max_batch)


def prompt(teacher: HFTeacher, text: str) -> list[int]:
    return teacher.encode_chat([{"role": "user", "content": text}])


async def tokens_of(engine: Engine, ids: list[int], options: SamplingOptions) -> list[list[int]]:
    """Each choice's generated token ids."""
    out: list[list[int]] = [[] for _ in range(options.n)]
    async for event in engine.generate(ids, options):
        if isinstance(event, Delta):
            out[event.choice] += event.token_ids
    return out


def run(engine: Engine, scenario: object) -> object:
    engine.start()
    try:
        return asyncio.run(scenario)  # type: ignore[arg-type]
    finally:
        engine.stop()


def test_a_request_joins_a_running_batch_and_finishes_first(teacher: HFTeacher) -> None:
    """Continuous batching: a short request sent while a long one decodes is prefilled into the
    running batch and returns long before the long one ends."""
    engine = make_engine(teacher)
    long = SamplingOptions(max_tokens=120, temperature=0, ignore_eos=True)
    short = SamplingOptions(max_tokens=3, temperature=0, ignore_eos=True)

    async def scenario() -> tuple[list[str], list[int], list[int]]:
        order: list[str] = []

        async def ask(name: str, ids: list[int], options: SamplingOptions) -> list[int]:
            (tokens,) = await tokens_of(engine, ids, options)
            order.append(name)
            return tokens

        first = asyncio.create_task(ask("long", prompt(teacher, "Hello"), long))
        while engine.decode_steps < 5:  # the long request is decoding
            await asyncio.sleep(0.005)
        second = await ask("short", prompt(teacher, "What is 2 + 3?"), short)
        return order, await first, second

    order, long_tokens, short_tokens = run(engine, scenario())
    assert order == ["short", "long"]
    assert engine.most_rows == 2
    assert len(long_tokens) == 120 and len(short_tokens) == 3
    # Joining did not change either answer: each equals its run alone.
    alone = make_engine(teacher)
    assert run(alone, tokens_of(alone, prompt(teacher, "Hello"), long)) == [long_tokens]
    assert run(alone, tokens_of(alone, prompt(teacher, "What is 2 + 3?"), short)) == [short_tokens]


def test_requests_of_different_lengths_and_settings_share_steps(teacher: HFTeacher) -> None:
    engine = make_engine(teacher)
    texts = ["Hi", "The capital of France is Paris.", "What is 7 * 6?"]
    settings = [
        SamplingOptions(max_tokens=6, temperature=0),
        SamplingOptions(max_tokens=6, temperature=0.8, seed=3, top_k=5),
        SamplingOptions(max_tokens=6, temperature=1.0, seed=4, n=2),
    ]

    async def scenario() -> list[list[list[int]]]:
        jobs = [
            tokens_of(engine, prompt(teacher, t), o) for t, o in zip(texts, settings, strict=True)
        ]
        return await asyncio.gather(*jobs)

    together = run(engine, scenario())
    assert engine.most_rows == 4
    for text, options, tokens in zip(texts, settings, together, strict=True):
        alone = make_engine(teacher)
        assert run(alone, tokens_of(alone, prompt(teacher, text), options)) == tokens


def test_a_cancelled_request_leaves_the_batch(teacher: HFTeacher) -> None:
    engine = make_engine(teacher)
    options = SamplingOptions(max_tokens=200, temperature=0, ignore_eos=True)

    async def scenario() -> int:
        seen = 0
        async for event in engine.generate(prompt(teacher, "Hello"), options):
            seen += isinstance(event, Delta)
            if seen == 3:
                break  # the consumer goes away
        for _ in range(200):
            if engine.running_rows == 0:
                break
            await asyncio.sleep(0.01)
        return engine.running_rows

    assert run(engine, scenario()) == 0
    assert engine.decode_steps < 100


def test_max_tokens_0_only_scores_the_prompt(teacher: HFTeacher) -> None:
    engine = make_engine(teacher)
    ids = prompt(teacher, "Hello")

    async def scenario() -> list[Prompt | Delta]:
        options = SamplingOptions(max_tokens=0, prompt_logprobs=0, n=2)
        return [event async for event in engine.generate(ids, options)]

    events = run(engine, scenario())
    assert isinstance(events[0], Prompt) and events[0].token_ids == ids
    assert events[0].logprobs is not None and len(events[0].logprobs) == len(ids)
    assert [e.finish_reason for e in events[1:]] == ["length", "length"]
    assert engine.decode_steps == 0


def test_stop_fails_requests_still_waiting(teacher: HFTeacher) -> None:
    engine = make_engine(teacher)

    async def scenario() -> BaseException | None:
        options = SamplingOptions(max_tokens=500, temperature=0, ignore_eos=True)
        job = asyncio.create_task(tokens_of(engine, prompt(teacher, "Hello"), options))
        while engine.decode_steps < 2:
            await asyncio.sleep(0.005)
        await asyncio.to_thread(engine.stop)
        try:
            await asyncio.wait_for(job, 10)
        except Exception as exc:
            return exc
        return None

    engine.start()
    error = asyncio.run(scenario())
    assert error is not None and "shutting down" in str(error)


class FailsOnce:
    """The model, except that its first forward raises (an out-of-memory error, say)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.inner, self.config, self.device = model, model.config, model.device
        self.forward = model.forward  # the engine reads its signature
        self.calls = 0

    def __call__(self, **inputs: object) -> object:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("out of memory")
        return self.inner(**inputs)


def test_a_failed_forward_fails_its_requests_and_the_engine_goes_on(teacher: HFTeacher) -> None:
    engine = Engine(FailsOnce(teacher.model), teacher.tokenizer, teacher.eos_ids)  # type: ignore[arg-type]
    options = SamplingOptions(max_tokens=3, temperature=0, ignore_eos=True)

    async def scenario() -> tuple[BaseException | None, list[list[int]]]:
        error = None
        try:
            await tokens_of(engine, prompt(teacher, "Hello"), options)
        except RuntimeError as exc:
            error = exc
        return error, await tokens_of(engine, prompt(teacher, "Hello"), options)

    error, second = run(engine, scenario())
    assert error is not None and "out of memory" in str(error)
    assert len(second[0]) == 3
