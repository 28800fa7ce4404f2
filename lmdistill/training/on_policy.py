"""On-policy distillation: the student samples, the teacher scores the student's tokens.

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from
Self-Generated Mistakes", arXiv:2306.13649): trained only on fixed responses, a student never sees
the prefixes its own mistakes lead to, and at generation time it has to continue them. On a
fraction `lambda` of the steps it therefore answers the step's prompts itself, and the logits
objective's divergence to the teacher is taken on those answers.

Which steps are on-policy is a pure function of (seed, step), so a resumed run and every process of
a multi-process run agree. What is sampled is a pure function of (seed, micro-batch stream index,
student weights), drawn from a forked RNG: it does not depend on how a step is split over processes
and leaves the training RNG untouched (lambda = 0 trains exactly like a run without on_policy).

A sampled example is the prompt of a data example (its tokens before the first loss target) plus
the student's tokens up to and including the first end-of-turn token, with targets on the sampled
tokens; the samples of one micro-batch are packed and collated exactly like the data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lmdistill.data.sft import IGNORE_INDEX, Batch, Example, collate, epoch_plan
from lmdistill.training.config import OnPolicy

# Distinct streams of the seeded generators (steps chosen, sampling seeds).
_STEP_STREAM, _SAMPLE_STREAM = 11, 12


def prompt_ids(example: Example) -> list[int]:
    """The tokens before the example's first loss target: the conversation up to where the first
    assistant turn starts (for a chat template, through its generation prompt)."""
    first = next(t for t, target in enumerate(example.targets) if target != IGNORE_INDEX)
    return example.input_ids[: first + 1]


def sampled_example(
    prompt: list[int], completion: list[int], stop_ids: set[int], max_length: int, index: int
) -> Example:
    """prompt + completion cut after its first stop token (and to `max_length` tokens), with
    targets on the completion's tokens."""
    end = next((i + 1 for i, t in enumerate(completion) if t in stop_ids), len(completion))
    ids = (prompt + completion[:end])[:max_length]
    targets = [IGNORE_INDEX] * len(ids)
    for t in range(len(prompt) - 1, len(ids) - 1):
        targets[t] = ids[t + 1]
    return Example(input_ids=ids, targets=targets, index=index)


class OnPolicySampler:
    """Chooses the on-policy steps and turns a micro-batch of data into the student's samples."""

    def __init__(
        self,
        settings: OnPolicy,
        *,
        seed: int,
        tokenizer,
        row_length: int,
        tokens_per_batch: int,
        packing: bool,
    ) -> None:
        self.settings = settings
        self.seed = seed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_id = tokenizer.eos_token_id
        self.plan = dict(row_length=row_length, tokens_per_batch=tokens_per_batch, packing=packing)

    def chosen(self, step: int) -> bool:
        """Whether optimizer step `step` trains on student samples (the same on every process)."""
        draw = np.random.default_rng([self.seed, step, _STEP_STREAM]).random()
        return bool(draw < self.settings.lambda_)

    def batches(
        self, model: nn.Module, examples: Sequence[Example], stream_index: int
    ) -> list[Batch]:
        """The student's samples for the prompts of `examples` (one micro-batch of data), packed
        and collated like the data, on the model's device, marked `sampled`."""
        samples = self.sample(model, examples, stream_index)
        plan = epoch_plan([len(e) for e in samples], seed=0, epoch=0, shuffle=False, **self.plan)
        device = next(model.parameters()).device
        batches = [collate(samples, micro_batch, self.pad_id).to(device) for micro_batch in plan]
        for batch in batches:
            batch.sampled = True
        return batches

    @torch.no_grad()
    def sample(
        self, model: nn.Module, examples: Sequence[Example], stream_index: int
    ) -> list[Example]:
        """One sampled `Example` per example: its prompt, left-padded into one generate call."""
        prompts = [prompt_ids(e) for e in examples]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        device = next(model.parameters()).device
        stop_ids = self._stop_ids(model)
        seed = np.random.default_rng([self.seed, stream_index, _SAMPLE_STREAM]).integers(2**62)
        was_training = model.training
        model.eval()  # no dropout while sampling
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(int(seed))
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=True,
                    temperature=self.settings.temperature,
                    top_p=self.settings.top_p,
                    top_k=0,  # the student's full distribution (a model's config may set top_k)
                    max_new_tokens=self.settings.max_new_tokens,
                    eos_token_id=sorted(stop_ids),
                    pad_token_id=self.pad_id,
                    use_cache=True,
                )
        finally:
            model.train(was_training)
        completions = out[:, width:].tolist()
        max_length = self.plan["row_length"]
        return [
            sampled_example(p, c, stop_ids, max_length, e.index)
            for p, c, e in zip(prompts, completions, examples, strict=True)
        ]

    def _stop_ids(self, model: nn.Module) -> set[int]:
        """End-of-turn tokens: the tokenizer's EOS and the model's generation config's."""
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(configured, int):
            configured = [configured]
        stop = {*(configured or ()), *([self.eos_id] if self.eos_id is not None else [])}
        return stop


def step_record(batches: Sequence[Batch], reduce: Callable[[Tensor], Tensor]) -> dict[str, float]:
    """`on_policy` (1 or 0) and, on an on-policy step, `sampled_length`: the mean number of
    sampled tokens per prompt over all processes (`reduce` sums over processes)."""
    sampled = [b for b in batches if b.sampled]
    if not sampled:
        return {"on_policy": 0}
    prompts = sum(int(((b.position_ids == 0) & b.real).sum()) for b in sampled)
    local = torch.tensor(
        [sum(b.loss_tokens for b in sampled), prompts],
        dtype=torch.float64,
        device=sampled[0].input_ids.device,
    )
    tokens, count = reduce(local).tolist()
    return {"on_policy": 1, "sampled_length": tokens / max(count, 1.0)}
