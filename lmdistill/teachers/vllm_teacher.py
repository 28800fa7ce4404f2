"""A teacher run in-process by vLLM (`pip install -e ".[vllm]"`, GPU machines).

vLLM batches and schedules the whole request list itself (continuous batching, paged KV cache), so
this teacher hands it every conversation at once and yields the results. It gives text and top-k
log-probs of the generated tokens; for full logits of given sequences (online logit KD) use the
local HF teacher, which shares the same model dir.

Spec: `vllm:MODEL_DIR_OR_BUNDLED_NAME` (e.g. `vllm:smollm2-135m-instruct`). Not importable on a
machine without vLLM: `load_teacher` then says how to install it.
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
            yield GenerationResult(
                index,
                generations=[
                    Generation(
                        text=choice.text,
                        finish_reason="length" if choice.finish_reason == "length" else "stop",
                        prompt_tokens=prompt_tokens,
                        completion_tokens=len(choice.token_ids),
                        latency_s=latency,
                        top_logprobs=_top_logprobs(choice.logprobs),
                    )
                    for choice in output.outputs
                ],
            )

    def close(self) -> None:
        del self.llm


def _top_logprobs(per_token: Any) -> list[list[tuple[str, float]]] | None:
    """vLLM's per-token {token_id: Logprob} dicts as (token, logprob) lists, best first."""
    if not per_token:
        return None
    return [
        [
            (lp.decoded_token or str(token_id), float(lp.logprob))
            for token_id, lp in sorted(entry.items(), key=lambda kv: -kv[1].logprob)
        ]
        for entry in per_token
    ]
