"""A teacher run in-process by vLLM (`pip install -e ".[vllm]"`, GPU machines).

vLLM batches and schedules the whole request list itself (continuous batching, paged KV cache), so
this teacher hands it every conversation at once and yields the results. It gives text and top-k
log-probs of the generated tokens, by token id as well as by text (`Generation.top_ids`,
`token_ids`: what an offline cache and the sparse loss index by); for full logits of given sequences (online logit KD) use the
local HF teacher, which shares the same model dir.

Spec: `vllm:MODEL` with MODEL a bundled name, a model dir or a Hub name (e.g.
`vllm:smollm2-135m-instruct`). Not importable on a machine without vLLM: `load_teacher` then says
how to install it.

Only the engine needs a GPU: the translation of its outputs below is tested on CPU with a stand-in
engine returning vLLM-shaped outputs (tests/teachers/test_vllm_teacher.py); loading a model into
`vllm.LLM` and its sampling run only on a GPU machine with vLLM installed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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


def import_vllm() -> Any:
    """The vllm module, or a UserError saying how to get it."""
    try:
        import vllm
    except ImportError as exc:
        raise UserError(
            f"teacher 'vllm:...' needs vLLM, which is not installed ({exc}); on a GPU machine: "
            "pip install -e '.[vllm]'"
        ) from None
    return vllm


class VLLMTeacher(Teacher):
    """Generation through vLLM's offline engine (`vllm.LLM`)."""

    capabilities = Capability.TEXT | Capability.TOPK_LOGPROBS

    def __init__(
        self,
        model_dir: str | Path,
        *,
        name: str | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        seed: int = 0,
    ) -> None:
        vllm = import_vllm()
        self._vllm = vllm
        self.name = name or Path(model_dir).name
        self.llm = vllm.LLM(
            model=str(model_dir),
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
        )

    def _sampling(self, params: SamplingParams) -> Any:
        return self._vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            seed=params.seed,
            logprobs=params.top_logprobs or None,
        )

    def iter_generate(
        self, conversations: Sequence[list[Message]], params: SamplingParams
    ) -> Iterator[GenerationResult]:
        start = time.perf_counter()
        try:
            outputs = self.llm.chat(
                [list(c) for c in conversations], self._sampling(params), use_tqdm=False
            )
        except ValueError as exc:  # vLLM rejects a whole batch for one bad conversation
            for index in range(len(conversations)):
                yield GenerationResult(index, failure=Failure("bad_request", str(exc), attempts=1))
            return
        latency = time.perf_counter() - start
        for index, output in enumerate(outputs):
            prompt_tokens = len(output.prompt_token_ids or [])
            generations = []
            for choice in output.outputs:
                generation = Generation(
                    text=choice.text,
                    finish_reason="length" if choice.finish_reason == "length" else "stop",
                    prompt_tokens=prompt_tokens,
                    completion_tokens=len(choice.token_ids),
                    latency_s=latency,
                )
                if choice.logprobs:
                    _add_logprobs(generation, choice, params.top_logprobs)
                generations.append(generation)
            yield GenerationResult(index, generations=generations)

    def close(self) -> None:
        del self.llm


def _add_logprobs(generation: Generation, choice: Any, k: int) -> None:
    """Fill `generation`'s top-k and sampled-token log-probs from vLLM's `choice.logprobs`: one
    {token_id: Logprob} dict per generated token, holding the k most likely tokens plus the
    sampled one when it is not among them (so a dict may have k + 1 entries). The ids are the
    dict's keys and `choice.token_ids`, the tokenizer's own, never re-tokenized text."""
    tops, top_ids, chosen, chosen_ids = [], [], [], []
    for token_id, entry in zip(choice.token_ids, choice.logprobs, strict=False):
        best = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[: max(k, 1)]
        tops.append([(_text(i, lp), float(lp.logprob)) for i, lp in best])
        top_ids.append([int(i) for i, _ in best])
        sampled = entry[token_id]  # vLLM always reports the sampled token's log-prob
        chosen.append((_text(token_id, sampled), float(sampled.logprob)))
        chosen_ids.append(int(token_id))
    generation.top_logprobs, generation.top_ids = tops, top_ids
    generation.token_logprobs, generation.token_ids = chosen, chosen_ids


def _text(token_id: int, logprob: Any) -> str:
    """A token's text as vLLM decoded it; its id when vLLM did not (detokenize=False)."""
    return logprob.decoded_token or str(token_id)
