"""Generation throughput, each number against a baseline measured in the same run.

    .venv/bin/python bench/generate.py                 # both parts
    .venv/bin/python bench/generate.py --part api      # only (b), no model needed

(a) local: the bundled teacher (smollm2-135m-instruct) through HFTeacher's batched generation, vs
    the design document's loop, `model.generate` on one prompt at a time. Same model object, same
    prompts, same max tokens, greedy. Tokens/s counts each response up to and including its EOS.
(b) api: `lmdistill.pipelines.generate` (OpenAITeacher, records fsynced, no cache) at concurrency
    16 vs 1, against a loopback server that waits a fixed latency per request and returns a canned
    answer. Responses/s.

The last line printed is one JSON object with `batched_vs_loop` and `concurrency16_vs_1`.
Targets: batched >= 5x, concurrency 16 >= 12x."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the loopback server


def prompt_texts(count: int) -> list[str]:
    """Varied short instructions, so batches hold prompts (and answers) of different lengths."""
    subjects = [
        "photosynthesis",
        "gravity",
        "the moon",
        "a rainbow",
        "volcanoes",
        "bread",
        "rivers",
    ]
    asks = ["Explain {} in one sentence.", "Write a haiku about {}.", "Give two facts about {}."]
    return [asks[i % len(asks)].format(subjects[i % len(subjects)]) for i in range(count)]


def bench_local(count: int, max_tokens: int, batch_size: int) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig

    from lmdistill.teachers.base import SamplingParams
    from lmdistill.teachers.local import HFTeacher, split_at_eos
    from lmdistill.teachers.registry import load_teacher

    teacher = load_teacher("smollm2-135m-instruct", batch_size=batch_size)
    assert isinstance(teacher, HFTeacher)
    conversations = [[{"role": "user", "content": text}] for text in prompt_texts(count)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    # Warm-up (first-call allocations, kernel selection) outside both timings.
    list(teacher.iter_generate(conversations[:2], params))

    # Baseline: the design document's loop, one prompt per model.generate call.
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_tokens,
        eos_token_id=teacher.eos_ids,
        pad_token_id=teacher.pad_id,
    )
    loop_texts, loop_tokens = [], 0
    start = time.perf_counter()
    for messages in conversations:
        ids = torch.tensor([teacher.encode_chat(messages)], device=teacher.device)
        with torch.no_grad():
            out = teacher.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config
            )
        content, _, used = split_at_eos(out[0, ids.shape[1] :].tolist(), teacher.eos_ids)
        loop_texts.append(teacher.tokenizer.decode(content, skip_special_tokens=True))
        loop_tokens += used
    loop_s = time.perf_counter() - start

    start = time.perf_counter()
    results = sorted(teacher.iter_generate(conversations, params), key=lambda r: r.index)
    batched_s = time.perf_counter() - start
    batched_tokens = sum(g.completion_tokens for r in results for g in r.generations)
    same = sum(r.generations[0].text == t for r, t in zip(results, loop_texts, strict=True))

    loop_rate, batched_rate = loop_tokens / loop_s, batched_tokens / batched_s
    print(f"(a) loop:    {loop_tokens} tokens in {loop_s:.1f}s = {loop_rate:.1f} tok/s")
    print(f"(a) batched: {batched_tokens} tokens in {batched_s:.1f}s = {batched_rate:.1f} tok/s")
    print(f"(a) greedy outputs identical to the loop's: {same}/{count}")
    return {
        "batched_vs_loop": round(batched_rate / loop_rate, 2),
        "loop_tok_s": round(loop_rate, 1),
        "batched_tok_s": round(batched_rate, 1),
        "local_prompts": count,
        "local_max_tokens": max_tokens,
        "local_batch_size": batch_size,
        "local_device": str(teacher.device),
        "greedy_identical": f"{same}/{count}",
    }


def bench_api(count: int, latency_s: float) -> dict[str, Any]:
    from faultserver import FaultPlan, FaultServer

    from lmdistill.pipelines.generate import Prompt, generate
    from lmdistill.teachers.base import SamplingParams
    from lmdistill.teachers.openai_api import OpenAITeacher

    prompts = [
        Prompt(id=str(i), messages=[{"role": "user", "content": t}], fields={}, line=i + 1)
        for i, t in enumerate(prompt_texts(count))
    ]
    params = SamplingParams(temperature=0.7, max_tokens=64)
    plan = FaultPlan(latency_s=latency_s, answer="A canned answer of a few words.")
    rates = {}
    with FaultServer(plan) as server, tempfile.TemporaryDirectory() as tmp:
        for concurrency in (1, 16):
            teacher = OpenAITeacher("canned", base_url=server.base_url, concurrency=concurrency)
            start = time.perf_counter()
            summary = generate(
                teacher, prompts, Path(tmp) / f"c{concurrency}.jsonl", params, progress=False
            )
            elapsed = time.perf_counter() - start
            assert summary.generated == count and summary.complete
            rates[concurrency] = count / elapsed
            print(
                f"(b) concurrency {concurrency:2d}: {count} responses in {elapsed:.2f}s "
                f"= {rates[concurrency]:.1f}/s ({latency_s * 1000:.0f} ms per request)"
            )
    return {
        "concurrency16_vs_1": round(rates[16] / rates[1], 2),
        "c1_responses_s": round(rates[1], 2),
        "c16_responses_s": round(rates[16], 2),
        "api_requests": count,
        "api_latency_ms": round(latency_s * 1000),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "local", "api"], default="all")
    parser.add_argument("--local-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--api-requests", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per API request")
    args = parser.parse_args()

    result: dict[str, Any] = {"cpu_count": os.cpu_count()}
    if args.part in ("all", "api"):
        result.update(bench_api(args.api_requests, args.latency))
    if args.part in ("all", "local"):
        result.update(bench_local(args.local_prompts, args.max_tokens, args.batch_size))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
