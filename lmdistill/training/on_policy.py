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

With `proposal: speculative` (SKD: Xu et al. 2024, "Speculative Knowledge Distillation",
arXiv:2410.11325) the student proposes every token and the teacher vets it: a proposal outside the
teacher's top-k is replaced by a token sampled from the teacher. A weak student's own samples drift
into states no good answer passes through (loops, wrong facts), where the teacher's distribution
is itself poor guidance; vetted samples stay where the teacher is a good guide while still
showing the student the prefixes it tends to write.

DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined Distillation for Large Language Models",
arXiv:2402.03898) adds two things, both optional here. `replay`: sampled examples go into a
bounded buffer, and once it is full an on-policy step samples fresh only with a probability that
falls to 0 over the run, else it trains on examples drawn from the buffer (sampling is the slow
part). `adaptive`: the probability of an on-policy step starts at `lambda` and rises by 0.1
whenever the held-out loss has risen by `adaptive_margin` since the last rise (or step 0), so the
student is trained on its own samples as it starts to drift from the data. Both keep the choice of
step kind a function of (seed, step) and of state every process shares (the held-out loss) or
that the checkpoint keeps (the buffer).

`drop_unfinished` keeps the targets only of samples that ended within the token cap (DAPO's
overlong filtering): at this project's scale the unfinished samples are loops, and the teacher,
reading a loop, predicts more of it. `server` draws the samples from an OpenAI-compatible server
holding a copy of the student's weights (`policy_server.py`) instead of in-process `generate`.

A sampled example is the prompt of a data example (its tokens before the first loss target) plus
the student's tokens up to and including the first end-of-turn token, with targets on the sampled
tokens; the samples of one micro-batch are packed and collated exactly like the data.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from lmdistill.data.sft import IGNORE_INDEX, Batch, Example, collate, epoch_plan
from lmdistill.teachers.sampling import top_p_filter
from lmdistill.training.config import OnPolicy
from lmdistill.training.policy_server import PolicyServerClient

# Distinct streams of the seeded generators (steps chosen, sampling seeds, replay draws).
_STEP_STREAM, _SAMPLE_STREAM, _REPLAY_STREAM = 11, 12, 13
ADAPTIVE_RISE = 0.1  # DistiLLM's increment of the on-policy probability

StepKind = Literal["data", "fresh", "replay"]


def prompt_ids(example: Example) -> list[int]:
    """The tokens before the example's first loss target: the conversation up to where the first
    assistant turn starts (for a chat template, through its generation prompt)."""
    first = next(t for t, target in enumerate(example.targets) if target != IGNORE_INDEX)
    return example.input_ids[: first + 1]


def sampled_example(
    prompt: list[int],
    completion: list[int],
    stop_ids: set[int],
    max_length: int,
    index: int,
    *,
    drop_unfinished: bool = False,
) -> tuple[Example, bool]:
    """prompt + completion cut after its first stop token (and to `max_length` tokens), with
    targets on the completion's tokens, and whether it finished (its stop token survived the
    cuts). With `drop_unfinished`, an unfinished sample has no targets."""
    stop = next((i for i, t in enumerate(completion) if t in stop_ids), None)
    end = len(completion) if stop is None else stop + 1
    ids = (prompt + completion[:end])[:max_length]
    finished = stop is not None and len(prompt) + end <= max_length
    targets = [IGNORE_INDEX] * len(ids)
    if finished or not drop_unfinished:
        for t in range(len(prompt) - 1, len(ids) - 1):
            targets[t] = ids[t + 1]
    return Example(input_ids=ids, targets=targets, index=index), finished


def _filtered_probs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """softmax(logits / temperature) restricted to the nucleus `top_p` and renormalised; (B, V)."""
    probs = top_p_filter(torch.softmax(logits.float() / temperature, dim=-1), top_p)
    return probs / probs.sum(-1, keepdim=True)


def speculative_mixture(
    student_probs: Tensor, teacher_probs: Tensor, top_k: int
) -> tuple[Tensor, Tensor]:
    """The distribution of SKD's proposal-and-vet step as one distribution, (B, V):
    a student sample x ~ q is kept when x is among the teacher's top `top_k` tokens (the set K),
    else replaced by a teacher sample y ~ t, so p(x) = q(x)·[x in K] + (1 - q(K))·t(x).
    Also returns q(K) (B,): the chance that the student's proposal is kept."""
    top = teacher_probs.topk(min(top_k, teacher_probs.size(-1)), dim=-1).indices
    in_k = torch.zeros_like(student_probs, dtype=torch.bool).scatter(-1, top, True)
    kept = student_probs * in_k
    kept_mass = kept.sum(-1)
    return kept + (1.0 - kept_mass).clamp(min=0.0)[:, None] * teacher_probs, kept_mass


@torch.no_grad()
def speculative_generate(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    top_k: int,
    temperature: float,
    top_p: float,
    stop_ids: set[int],
    pad_id: int,
) -> tuple[Tensor, tuple[float, float]]:
    """Sample up to `max_new_tokens` tokens per left-padded prompt row, the student proposing and
    the teacher vetting each token (`speculative_mixture`); both models keep a KV cache, so each
    new token costs one single-token forward of each. Returns the new tokens (B, <= max_new_tokens;
    `pad_id` after a row's stop token), and the expected number of proposals kept over the
    number of tokens sampled (summed over live rows)."""
    mask = attention_mask.clone()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    student_out = student(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True
    )
    teacher_out = teacher(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True
    )
    next_position = positions[:, -1] + 1
    stop = torch.tensor(sorted(stop_ids), device=input_ids.device)
    done = torch.zeros(input_ids.size(0), dtype=torch.bool, device=input_ids.device)
    tokens: list[Tensor] = []
    kept = offered = 0.0
    for _ in range(max_new_tokens):
        # The two heads may be padded to different widths; tokens past the shorter are unused.
        vocab = min(student_out.logits.size(-1), teacher_out.logits.size(-1))
        q = _filtered_probs(student_out.logits[:, -1, :vocab], temperature, top_p)
        t = _filtered_probs(teacher_out.logits[:, -1, :vocab], temperature, top_p)
        p, kept_mass = speculative_mixture(q, t, top_k)
        token = torch.multinomial(p, 1).squeeze(-1)
        # Expected share kept (q(K)), a lower-variance estimate than counting accepted draws.
        live = ~done
        kept += float(kept_mass[live].sum())
        offered += float(live.sum())
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        done = done | torch.isin(token, stop)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        step = dict(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=next_position[:, None],
            use_cache=True,
        )
        student_out = student(**step, cache=student_out.cache)
        teacher_out = teacher(**step, cache=teacher_out.cache)
        next_position = next_position + 1
    return torch.stack(tokens, dim=1), (kept, offered)


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
        teacher: nn.Module | None = None,
        total_steps: int = 1,
        server: PolicyServerClient | None = None,
    ) -> None:
        if settings.proposal == "speculative" and teacher is None:
            raise ValueError("a speculative proposal needs the teacher model")
        self.settings = settings
        self.total_steps = max(total_steps, 1)
        self.threshold = settings.lambda_  # the on-policy probability (adaptive: it rises)
        self.reference_loss: float | None = None  # adaptive: the held-out loss of the last rise
        self.buffer: deque[Example] = deque(maxlen=settings.replay or None)
        self.teacher = teacher if settings.proposal == "speculative" else None
        self.server = server  # sample through an OpenAI-compatible server instead of generate
        self._kept = [0.0, 0.0]  # speculative: proposals kept, tokens sampled (since last read)
        self._finished = [0, 0]  # samples that ended with a stop token, samples (since last read)
        self.seed = seed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_id = tokenizer.eos_token_id
        self.plan = dict(row_length=row_length, tokens_per_batch=tokens_per_batch, packing=packing)

    def kind(self, step: int) -> StepKind:
        """What optimizer step `step` trains on (the same on every process): the data, fresh
        student samples, or samples replayed from the buffer. A draw in [0, 1) below the on-policy probability makes an
        on-policy step; with `replay`, it samples fresh while the buffer fills and afterwards when
        the draw is also below probability x (1 - step / total steps) (DistiLLM's schedule)."""
        draw = np.random.default_rng([self.seed, step, _STEP_STREAM]).random()
        if draw >= self.threshold:
            return "data"
        if not self.settings.replay or len(self.buffer) < self.settings.replay:
            return "fresh"
        fresh = self.threshold * (1.0 - step / self.total_steps)
        return "fresh" if draw < fresh else "replay"

    def observe(self, held_out_loss: float) -> bool:
        """Adaptive schedule: record an evaluation's held-out loss; the on-policy probability
        rises by 0.1 (to at most 1) when the loss is `adaptive_margin` above the reference (the
        loss at the last rise, or the first loss seen). Returns whether it rose."""
        if not self.settings.adaptive:
            return False
        if self.reference_loss is None:
            self.reference_loss = held_out_loss
            return False
        if held_out_loss < self.reference_loss + self.settings.adaptive_margin:
            return False
        self.threshold = min(1.0, self.threshold + ADAPTIVE_RISE)
        self.reference_loss = held_out_loss
        return True

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the schedule and this process's replay buffer."""
        return {
            "threshold": self.threshold,
            "reference_loss": self.reference_loss,
            "buffer": [
                {"input_ids": e.input_ids, "targets": e.targets, "index": e.index}
                for e in self.buffer
            ],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.threshold = float(state["threshold"])
        self.reference_loss = state["reference_loss"]
        self.buffer.clear()
        self.buffer.extend(Example(**e) for e in state["buffer"])

    def batches(
        self,
        model: nn.Module,
        examples: Sequence[Example],
        stream_index: int,
        *,
        replay: bool = False,
    ) -> list[Batch]:
        """The student's samples for the prompts of `examples` (one micro-batch of data), packed
        and collated like the data, on the model's device, marked `sampled`. With `replay`, as
        many examples drawn from the buffer instead (no sampling); fresh samples join the buffer
        when it is on."""
        if replay:
            draw = np.random.default_rng([self.seed, stream_index, _REPLAY_STREAM])
            picks = draw.choice(
                len(self.buffer), size=min(len(examples), len(self.buffer)), replace=False
            )
            samples = [self.buffer[int(i)] for i in picks]
        else:
            samples = self.sample(model, examples, stream_index)
            if self.settings.replay:
                self.buffer.extend(samples)
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
                if self.server is not None:
                    completions = self.server.sample(
                        prompts,
                        max_new_tokens=self.settings.max_new_tokens,
                        temperature=self.settings.temperature,
                        top_p=self.settings.top_p,
                        seed=int(seed),
                        stop_ids=stop_ids,
                    )
                elif self.teacher is not None:  # a speculative proposal
                    completions, (kept, offered) = speculative_generate(
                        model,
                        self.teacher,
                        ids.to(device),
                        mask.to(device),
                        max_new_tokens=self.settings.max_new_tokens,
                        top_k=self.settings.teacher_top_k,
                        temperature=self.settings.temperature,
                        top_p=self.settings.top_p,
                        stop_ids=stop_ids,
                        pad_id=self.pad_id,
                    )
                    self._kept[0] += kept
                    self._kept[1] += offered
                    completions = completions.tolist()
                else:
                    out = model.generate(
                        input_ids=ids.to(device),
                        attention_mask=mask.to(device),
                        do_sample=True,
                        temperature=self.settings.temperature,
                        top_p=self.settings.top_p,
                        top_k=0,  # the student's full distribution (a model's config may set it)
                        max_new_tokens=self.settings.max_new_tokens,
                        eos_token_id=sorted(stop_ids),
                        pad_token_id=self.pad_id,
                        use_cache=True,
                    )
                    completions = out[:, width:].tolist()
        finally:
            model.train(was_training)
        max_length = self.plan["row_length"]
        drop = self.settings.drop_unfinished
        samples = []
        for p, c, e in zip(prompts, completions, examples, strict=True):
            sample, finished = sampled_example(
                p, c, stop_ids, max_length, e.index, drop_unfinished=drop
            )
            samples.append(sample)
            self._finished[0] += finished
            self._finished[1] += 1
        return samples

    def take_stats(self) -> dict[str, float]:
        """This process's figures over the samples drawn since the last call (one optimizer
        step's micro-batches), then reset: `unfinished`, the share of samples with no end-of-turn
        token, and for speculative proposals `proposal_kept`, the share of the student's
        proposals kept. Empty after a data or replay step."""
        stats: dict[str, float] = {}
        if self._finished[1]:
            stats["unfinished"] = 1.0 - self._finished[0] / self._finished[1]
        if self.teacher is not None and self._kept[1]:
            stats["proposal_kept"] = self._kept[0] / self._kept[1]
        self._kept, self._finished = [0.0, 0.0], [0, 0]
        return stats

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
