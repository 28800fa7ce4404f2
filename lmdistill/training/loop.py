"""One training loop, on Hugging Face Accelerate, for every method (the objectives are plug-ins).

A step: the global counts of loss tokens and real tokens over the step's micro-batches on all
processes are summed first (one all-reduce of two numbers), and every loss divides by them. Each
process then runs its micro-batches (gradients synchronised only on the last one), clips, and
steps. Because every loss is `sum / global count`, the summed gradient is the same whether a
step's micro-batches run on one process with accumulation or on several (TRL passes
`num_items_in_batch` for the same reason; cf. the gradient-accumulation loss bug fixed in
transformers 4.46).

Data: the micro-batches of each epoch are a pure function of (seed, epoch) (`data.sft.epoch_plan`),
concatenated into one stream; step s takes stream items [s*M, (s+1)*M) and process r of W takes
items s*M + r*M/W .. s*M + (r+1)*M/W - 1. A checkpoint therefore saves only the step counter as
the data position, and a 2-process run sees exactly the batches of the 1-process run.

Run dir:  config.yaml (the resolved recipe), metrics.jsonl, checkpoints/step-NNNNNNNN/ (Accelerate
state: model, optimizer, scheduler, RNG states of every process; trainer_state.json written last
marks it complete), final/ (an HF model dir), summary.json, student-init/ (a student built from
the teacher), tensorboard/ (when tensorboard is installed).

A crash at any moment (issue 19): final/ is written into a temporary sibling and renamed into
place with a completion marker (`lmdistill.store.atomic_dir`), so it exists whole or not at all;
with checkpoints on, the last step is checkpointed before final/ is written, so a plain rerun
finishes an interrupted save without training again; metrics.jsonl loses at most a torn last
line, and a resume never logs a step, or an evaluation at a step, twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmdistill.data.jsonl import write_jsonl_atomic
from lmdistill.data.records import field_map
from lmdistill.data.sft import (
    IGNORE_INDEX,
    Batch,
    Examples,
    MicroBatch,
    Plan,
    SpanWeights,
    check_packing,
    collate,
    epoch_plan,
    load_examples,
)
from lmdistill.errors import InputError, UserError, say
from lmdistill.store.atomic import (
    crash_point,
    dir_state,
    read_jsonl_tolerant,
    write_json_atomic,
    write_text_atomic,
)
from lmdistill.store.settings import changed_settings
from lmdistill.teachers.forward import base_model
from lmdistill.training.config import (
    HiddenObjective,
    LogitsObjective,
    SftObjective,
    TrainConfig,
    UldObjective,
    dump,
    logits_source,
)
from lmdistill.training.cross_tokenizer import load_cross_teacher
from lmdistill.training.evaluate import evaluate
from lmdistill.training.objectives import (
    DistillModule,
    Hidden,
    Logits,
    OnlineTeacher,
    Sft,
    Uld,
    check_layer_map,
    default_layer_map,
)
from lmdistill.training.on_policy import OnPolicySampler, step_record
from lmdistill.training.policy_server import PolicyServerClient
from lmdistill.training.signals import Counts
from lmdistill.training.students import (
    LoraSettings,
    apply_lora,
    load_model_dir,
    non_embedding_parameters,
    resolve_model_dir,
    save_student,
    source_layers,
    student_from_teacher,
)

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)  # step records of this call
    eval: dict[str, float] | None = None  # the last evaluation


class LrSchedule:
    """Multiplier of the peak LR after `step` optimizer steps: linear warmup from 1/warmup to 1,
    then cosine / linear decay to `min_ratio` at `total` steps (or constant)."""

    def __init__(self, kind: str, warmup: int, total: int, min_ratio: float) -> None:
        self.kind, self.warmup, self.total, self.min_ratio = kind, warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.min_ratio + (1 - self.min_ratio) * shape


class MicroBatchStream:
    """Epoch plans concatenated into one indexable stream of micro-batches."""

    def __init__(
        self,
        lengths: np.ndarray,
        *,
        seed: int,
        row_length: int,
        tokens_per_batch: int,
        packing: bool,
    ) -> None:
        self.lengths = lengths
        self.settings = dict(
            seed=seed, row_length=row_length, tokens_per_batch=tokens_per_batch, packing=packing
        )
        self._plans: dict[int, Plan] = {}
        self._starts = [0]  # stream index where each planned epoch starts

    def plan(self, epoch: int) -> Plan:
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}  # bounded memory
            self._plans[epoch] = epoch_plan(self.lengths, epoch=epoch, **self.settings)
        return self._plans[epoch]

    def __getitem__(self, index: int) -> MicroBatch:
        epoch = 0
        while True:
            if epoch + 1 >= len(self._starts):
                self._starts.append(self._starts[-1] + len(self.plan(epoch)))
            if index < self._starts[epoch + 1]:
                return self.plan(epoch)[index - self._starts[epoch]]
            epoch += 1


class Trainer:
    """Builds everything a run needs from a `TrainConfig`; `run()` trains."""

    def __init__(self, config: TrainConfig, *, resume: bool = False) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        self.config = config
        objectives = config.objectives
        # DDP must be told when some parameters get no gradient: without an sft/logits objective
        # the final norm and LM head are unused.
        uses_head = any(not isinstance(o, HiddenObjective) for o in objectives)
        self.accelerator = Accelerator(
            cpu=_cpu_only(),
            mixed_precision=_mixed_precision(config.precision),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=not uses_head)],
        )
        self.main = self.accelerator.is_main_process
        self.run_dir = Path(config.run_dir)
        self.resume = resume
        self._check_run_dir()
        set_seed(config.seed)
        student, self.tokenizer, student_dir = self._load_student()
        self.train_examples, self.eval_examples = self._load_data()
        self.cache = self._load_cache()
        teacher_model = self._load_teacher_model()
        modules, weights, teacher_layers = self._objectives(student, student_dir, teacher_model)
        self.teacher = (
            OnlineTeacher(teacher_model, teacher_layers) if teacher_model is not None else None
        )
        # ULD: a teacher with its own tokenizer, reading its own tokenization of each batch.
        self.cross = load_cross_teacher(config, self.accelerator.device, self.train_examples)
        if self.cross is not None:
            self.teacher = self.cross
        self.stream = MicroBatchStream(
            self.train_examples.lengths,
            seed=config.seed,
            row_length=config.data.max_length,
            tokens_per_batch=config.batch.tokens_per_micro_batch,
            packing=config.batch.packing,
        )
        self.on_policy = None
        if config.on_policy is not None:
            if self.accelerator.distributed_type == "FSDP":
                # Sampling calls the unwrapped student's generate, which needs whole weights.
                raise UserError("on_policy: not supported with FSDP (use DDP or one process)")
            self.on_policy = OnPolicySampler(
                config.on_policy,
                teacher=teacher_model,  # the config asks on-policy runs for an online teacher
                seed=config.seed,
                tokenizer=self.tokenizer,
                row_length=config.data.max_length,
                tokens_per_batch=config.batch.tokens_per_micro_batch,
                packing=config.batch.packing,
                server=(
                    None
                    if config.on_policy.server is None
                    else PolicyServerClient(config.on_policy.server, self.run_dir)
                ),
            )
        self.total_steps = self._total_steps()
        if self.on_policy is not None:
            self.on_policy.total_steps = self.total_steps
        self._step_kind = "data"  # what the last step_batches call trained on
        module = DistillModule(student, modules, weights)
        self.optimizer = _adamw(module, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            LrSchedule(
                config.optim.schedule,
                config.optim.warmup_steps,
                self.total_steps,
                config.optim.min_lr_ratio,
            ),
        )
        # The scheduler is stepped by hand once per optimizer step (Accelerate's wrapper would step
        # it once per process), and checkpointed through register_for_checkpointing.
        self.module, self.optimizer = self.accelerator.prepare(module, self.optimizer)
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.step = 0
        self.info = {
            "student_non_embedding_parameters": non_embedding_parameters(base_model(student)),
            "train_examples": len(self.train_examples),
            "eval_examples": len(self.eval_examples),
            "total_steps": self.total_steps,
            "processes": self.accelerator.num_processes,
        }
        if self.cross is not None:  # how much of the student's responses ULD covers
            self.info["uld_aligned_fraction"] = round(self.cross.aligned_fraction, 4)

    # ------------------------------------------------------------------------------ setup
    def _check_run_dir(self) -> None:
        saved = self.run_dir / "config.yaml"
        final = self.run_dir / "final"
        checkpoint = latest_checkpoint(self.run_dir)
        state = dir_state(final)
        how = "--resume"
        if not self.resume and state != "whole" and checkpoint and _is_last_step(checkpoint):
            # Training had ended and its last step is checkpointed: only the final save was cut
            # short, so a plain rerun finishes it rather than asking for --resume (issue 19).
            self._say(
                f"{self.run_dir}: training had finished but saving final/ was interrupted; "
                f"finishing it from {checkpoint.name}"
            )
            self.resume, how = True, "finishing the interrupted save"
        if self.resume:
            if checkpoint is None:
                raise UserError(
                    f"--resume: {self.run_dir} has no complete checkpoint to resume from"
                )
            previous = _load_yaml(saved) if saved.is_file() else None
            now = json.loads(json.dumps(self.config.model_dump(mode="json")))
            changed = changed_settings(previous or {}, now, ignore=("log",))
            if changed:
                raise UserError(
                    f"{how}: the recipe differs from the one {self.run_dir} was started with "
                    f"({', '.join(changed)}); resuming would not continue the same run"
                )
        elif checkpoint is not None or state == "whole":
            raise UserError(
                f"{self.run_dir} already holds a run; pass --resume to continue it or set run_dir elsewhere"
            )
        if state == "torn":  # only an in-place save of a version before issue 19 leaves this
            self._say(f"{final}: incomplete (its save was interrupted); it will be rebuilt")
        if self.main and not self.resume:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(saved, dump(self.config))
        self.accelerator.wait_for_everyone()

    def _say(self, line: str) -> None:
        if self.main:  # one line per run, not one per process
            say(line)

    def _load_student(self):
        spec = self.config.student
        if spec.from_teacher is not None:
            student_dir = self.run_dir / "student-init"
            if self.main and not (student_dir / "lmdistill_student.json").is_file():
                ft = spec.from_teacher
                student_from_teacher(
                    ft.teacher,
                    layers=ft.layers,
                    out_dir=student_dir,
                    intermediate_size=ft.intermediate_size,
                    hidden_size=ft.hidden_size,
                    selection=ft.selection,
                    calibration=(
                        self._calibration_texts(ft) if ft.selection == "importance" else None
                    ),
                    calibration_tokens=ft.calibration_tokens,
                )
            self.accelerator.wait_for_everyone()
        else:
            student_dir = resolve_model_dir(spec.model)
        student, tokenizer = load_model_dir(student_dir)
        student.config.use_cache = False
        if spec.liger:
            _apply_liger(student, self.accelerator.device)
        if self.config.batch.packing:
            check_packing(student)
        if spec.lora is not None:
            lora = spec.lora
            targets = (
                lora.target_modules
                if isinstance(lora.target_modules, str)
                else tuple(lora.target_modules)
            )
            student = apply_lora(student, LoraSettings(lora.r, lora.alpha, lora.dropout, targets))
        return student.to(self.accelerator.device).train(), tokenizer, student_dir

    def _calibration_texts(self, ft) -> list[str]:
        """The first `ft.calibration` examples of the training data, tokenized with the teacher's
        tokenizer (the student's, once built) and decoded back to text with their chat markup:
        what an importance ranking reads."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(ft.teacher))
        examples = self._training_file(tokenizer)
        count = min(ft.calibration, len(examples))
        return [tokenizer.decode(examples[i].input_ids) for i in range(count)]

    def _training_file(self, tokenizer, span_weights: SpanWeights | None = None) -> Examples:
        """Every example of data.path (its split, its field mapping), tokenized by `tokenizer`."""
        data = self.config.data
        return load_examples(
            data.path,
            tokenizer,
            max_length=data.max_length,
            split=data.split,
            span_weights=span_weights,
            fields=field_map(data.fields),
        ).examples

    def _load_data(self) -> tuple[Examples, Examples]:
        """The training and held-out examples, from the token cache (`data.tokens`): tokenized
        by the first process to get there, read by the others and by every later run."""
        data = self.config.data
        span_weights = data.span_weights and SpanWeights(**data.span_weights.model_dump())
        fields = field_map(data.fields)
        examples = self._training_file(self.tokenizer, span_weights)
        if data.eval_path is not None:  # held-out data of the same shape as the training data
            held_out = load_examples(
                data.eval_path, self.tokenizer, max_length=data.max_length, fields=fields
            ).examples
            return examples, held_out
        n_eval = round(len(examples) * data.eval_fraction)
        if data.eval_fraction > 0 and len(examples) > 1:
            n_eval = max(1, n_eval)
        order = np.random.default_rng([self.config.seed, 1]).permutation(len(examples))
        held = np.sort(order[:n_eval])
        keep = np.ones(len(examples), dtype=bool)
        keep[held] = False
        train = examples.subset(np.flatnonzero(keep))
        if not len(train):
            raise UserError(
                f"{data.path}: no examples left for training after holding out {n_eval}"
            )
        return train, examples.subset(held)

    def _load_cache(self):
        cached = any(
            isinstance(o, LogitsObjective) and logits_source(o, self.config.teacher) == "cache"
            for o in self.config.objectives
        )
        if not cached:
            return None
        from lmdistill.teachers.cache import TopkCache

        cache = TopkCache(self.config.teacher.cache)
        data = self.config.data
        cache.check_compatible(self.tokenizer, data.path, data.max_length, field_map(data.fields))
        return cache

    def _load_teacher_model(self):
        needs = any(
            isinstance(o, HiddenObjective)
            or (
                isinstance(o, LogitsObjective) and logits_source(o, self.config.teacher) == "online"
            )
            for o in self.config.objectives
        )
        if not needs:
            return None
        from lmdistill.teachers.base import Capability
        from lmdistill.teachers.registry import is_api_spec, load_teacher

        spec = self.config.teacher
        # An API teacher takes no device; it is refused just below for having no logits.
        local = not is_api_spec(spec.model)
        options = {"device": str(self.accelerator.device), "dtype": spec.dtype} if local else {}
        teacher = load_teacher(spec.model, **options)
        teacher.require(Capability.FULL_LOGITS, "online logit or hidden-state distillation")
        if teacher.tokenizer.get_vocab() != self.tokenizer.get_vocab():  # type: ignore[attr-defined]
            raise UserError(
                f"teacher '{spec.model}' and the student use different tokenizers; logit and "
                "hidden-state distillation need the same vocabulary"
            )
        return teacher.model  # type: ignore[attr-defined]

    def _objectives(self, student, student_dir: Path, teacher_model):
        modules, weights, teacher_layers = {}, {}, set()
        student_config = base_model(student).config
        for objective in self.config.objectives:
            if isinstance(objective, SftObjective):
                module = Sft(objective)
            elif isinstance(objective, LogitsObjective):
                module = Logits(
                    objective, cached=logits_source(objective, self.config.teacher) == "cache"
                )
            elif isinstance(objective, UldObjective):
                module = Uld(objective)
            else:
                module = self._hidden(objective, student_config, student_dir, teacher_model.config)
            modules[objective.kind] = module
            weights[objective.kind] = objective.weight
            teacher_layers.update(module.teacher_layers)
        return modules, weights, sorted(teacher_layers)

    def _hidden(
        self, objective: HiddenObjective, student_config, student_dir: Path, teacher_config
    ) -> Hidden:
        ls, lt = student_config.num_hidden_layers, teacher_config.num_hidden_layers
        layer_map = objective.layer_map or default_layer_map(ls, lt, source_layers(student_dir))
        check_layer_map(layer_map, ls, lt)
        module = Hidden(
            objective, layer_map, student_config.hidden_size, teacher_config.hidden_size
        )
        return module.to(self.accelerator.device)

    def _total_steps(self) -> int:
        optim, m = self.config.optim, self.config.batch.micro_batches_per_step
        if m % self.accelerator.num_processes:
            raise UserError(
                f"batch.micro_batches_per_step ({m}) must be a multiple of the number of processes "
                f"({self.accelerator.num_processes})"
            )
        if self.config.batch.tokens_per_micro_batch < self.config.data.max_length:
            raise UserError(
                f"batch.tokens_per_micro_batch ({self.config.batch.tokens_per_micro_batch}) must hold "
                f"one example of data.max_length ({self.config.data.max_length}) tokens"
            )
        if optim.steps is not None:
            return optim.steps
        return max(1, int(optim.epochs * len(self.stream.plan(0)) / m))

    # ------------------------------------------------------------------------------ batches
    def _batch(self, examples: Examples, micro_batch: MicroBatch, cached: bool) -> Batch:
        lookup = self.cache.lookup if (cached and self.cache is not None) else None
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = collate(examples, micro_batch, pad, lookup).to(self.accelerator.device)
        if self.cross is not None and examples is self.train_examples:
            batch.teacher_side = self.cross.rows(examples, micro_batch).to(batch.input_ids.device)
        return batch

    def step_batches(self, step: int) -> list[Batch]:
        """This process's micro-batches of optimizer step `step`; on an on-policy step, the
        student's samples for their prompts instead."""
        m = self.config.batch.micro_batches_per_step
        per_process = m // self.accelerator.num_processes
        first = step * m + self.accelerator.process_index * per_process
        self._step_kind = "data" if self.on_policy is None else self.on_policy.kind(step)
        if self.on_policy is not None and self._step_kind != "data":
            student = self.accelerator.unwrap_model(self.module).student
            replay = self._step_kind == "replay"
            server = self.on_policy.server
            if not replay and server is not None and server.due(step):
                if self.main:  # one copy of the weights; every process samples from it
                    server.push(student)
                server.synced_step = step
                self.accelerator.wait_for_everyone()
            return [
                batch
                for i in range(first, first + per_process)
                for batch in self.on_policy.batches(
                    student,
                    [self.train_examples[j] for row in self.stream[i] for j in row],
                    i,
                    replay=replay,
                )
            ]
        return [
            self._batch(self.train_examples, self.stream[i], True)
            for i in range(first, first + per_process)
        ]

    def eval_batches(self) -> list[Batch]:
        plan = epoch_plan(
            self.eval_examples.lengths,
            seed=0,
            epoch=0,
            row_length=self.config.data.max_length,
            tokens_per_batch=self.config.batch.tokens_per_micro_batch,
            packing=self.config.batch.packing,
            shuffle=False,
        )
        plan = plan[: self.config.eval.max_batches]
        processes = self.accelerator.num_processes
        mine = plan[self.accelerator.process_index :: processes]
        # A held-out file has no cache rows; examples split off the training file do.
        cached = self.config.data.eval_path is None
        batches = [self._batch(self.eval_examples, mb, cached) for mb in mine]
        # Every process runs as many held-out forwards as the first: under DDP (buffer broadcast)
        # and FSDP (parameter all-gather) a forward is a collective, so a process out of batches
        # would leave the others waiting in theirs forever (issue 16). A filler counts no token.
        rounds = -(-len(plan) // processes)
        if len(batches) < rounds:
            filler = self._batch(self.eval_examples, plan[0], cached)
            filler = replace(filler, targets=torch.full_like(filler.targets, IGNORE_INDEX))
            batches += [filler] * (rounds - len(batches))
        return batches

    # ------------------------------------------------------------------------------ training
    def train_step(self, batches: list[Batch]) -> dict[str, float]:
        """One optimizer step over this process's micro-batches."""
        counts = self._global_counts(batches)
        if not counts.loss_tokens:  # e.g. on-policy samples that all were dropped unfinished
            self.scheduler.step()  # the schedule stays a function of the step
            return {
                "step": self.step + 1,
                "loss": 0.0,
                "skipped": 1,
                "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": 0.0,
                "tokens": int(counts.tokens),
                "loss_tokens": 0,
            }
        parts: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            teacher = self.teacher(batch) if self.teacher is not None else None
            sync = (
                contextlib.nullcontext()
                if i == len(batches) - 1
                else self.accelerator.no_sync(self.module)
            )
            with sync:
                with self.accelerator.autocast():
                    loss, losses = self.module(batch, teacher, counts)
                # DDP averages gradients over processes; each loss already divides by the global
                # count, so the average is undone to get the sum.
                self.accelerator.backward(loss * self.accelerator.num_processes)
            for name, value in losses.items():
                parts[name] = parts.get(name, 0) + value.detach().float()
        grad_norm = self._clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._step_record(parts, counts, grad_norm)

    def _global_counts(self, batches: list[Batch]) -> Counts:
        local = torch.tensor(
            [sum(b.loss_tokens for b in batches), sum(b.tokens for b in batches)],
            dtype=torch.float64,
            device=self.accelerator.device,
        )
        total = self.accelerator.reduce(local, reduction="sum")
        return Counts(loss_tokens=total[0].float(), tokens=total[1].float())

    def _clip(self) -> float:
        max_norm = self.config.optim.max_grad_norm
        params = [p for p in self.module.parameters() if p.requires_grad]
        if max_norm is None:
            return float(
                torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
            )
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    def _step_record(
        self, parts: dict[str, torch.Tensor], counts: Counts, grad_norm: float
    ) -> dict[str, Any]:
        names = sorted(parts)
        summed = self.accelerator.reduce(
            torch.stack([parts[n] for n in names]), reduction="sum"
        ).tolist()
        weights = self.accelerator.unwrap_model(self.module).weights
        record: dict[str, Any] = {
            "step": self.step + 1,
            "loss": sum(weights[n] * v for n, v in zip(names, summed, strict=True)),
        }
        record.update({f"loss/{n}": v for n, v in zip(names, summed, strict=True)})
        record.update(
            lr=self.scheduler.get_last_lr()[0],
            grad_norm=grad_norm,
            tokens=int(counts.tokens),
            loss_tokens=int(counts.loss_tokens),
        )
        return record

    def _sum_over_processes(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, reduction="sum")

    def run_eval(self) -> dict[str, float]:
        def reduce(t: torch.Tensor) -> torch.Tensor:
            return self.accelerator.reduce(t.to(self.accelerator.device), reduction="sum").cpu()

        # A cross-tokenizer teacher shares no vocabulary for KL / top-1: held-out CE only.
        teacher = None if self.cross is not None else self.teacher
        return evaluate(self.module, self.eval_batches(), teacher, reduce)

    def save_checkpoint(self) -> Path:
        path = checkpoint_dir(self.run_dir, self.step)
        if self.on_policy is not None:  # the schedule and this process's replay buffer
            path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                path / f"on_policy{self.accelerator.process_index}.json", self.on_policy.state()
            )
        # Tied embeddings are stored once; Accelerate warns "Removed shared tensor" every time.
        with _quiet("accelerate.utils.other"):
            self.accelerator.save_state(str(path))
        if self.main:
            write_json_atomic(
                path / TRAINER_STATE,
                {
                    "step": self.step,
                    "micro_batches": self.step * self.config.batch.micro_batches_per_step,
                    "total_steps": self.total_steps,  # step == total_steps: training had ended
                },
            )
            complete = sorted(
                p for p in (self.run_dir / CHECKPOINTS).iterdir() if (p / TRAINER_STATE).is_file()
            )
            for old in complete[: -self.config.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self) -> None:
        path = latest_checkpoint(self.run_dir)
        self.accelerator.load_state(str(path))
        self.step = json.loads((path / TRAINER_STATE).read_text())["step"]
        state = path / f"on_policy{self.accelerator.process_index}.json"
        if self.on_policy is not None and state.is_file():
            self.on_policy.load_state(json.loads(state.read_text()))

    def run(self) -> TrainResult:
        """Train to `total_steps`, evaluating and checkpointing on schedule; save final/."""
        if self.resume:
            self.load_checkpoint()
        log = MetricsLog(
            self.run_dir,
            enabled=self.main,
            keep_until=self.step if self.resume else 0,
            tensorboard=self.config.log.tensorboard,
        )
        if self.main and not self.resume:
            log.write({"step": 0, "info": self.info})
        adaptive = self.on_policy is not None and self.on_policy.settings.adaptive
        if adaptive and not self.resume and self.eval_examples:
            self._log_eval(log)  # the adaptive schedule's first reference: the loss at step 0
        every_eval, every_ckpt = self.config.eval.every, self.config.checkpoint.every
        bar = _progress_bar(
            self.total_steps, self.step, enabled=self.main and self.config.log.progress
        )
        history, last_eval = [], None
        try:
            while self.step < self.total_steps:
                started = time.perf_counter()
                batches = self.step_batches(self.step)
                record = self.train_step(batches)
                if self.on_policy is not None:
                    record.update(step_record(batches, self._sum_over_processes))
                    if self._step_kind == "replay":
                        record["replayed"] = 1
                    if self.on_policy.settings.adaptive:
                        record["on_policy_probability"] = self.on_policy.threshold
                    record.update(self.on_policy.take_stats())
                self.step += 1
                record["tokens_per_s"] = record["tokens"] / max(time.perf_counter() - started, 1e-9)
                history.append(record)
                log.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if self.eval_examples and every_eval and self.step % every_eval == 0:
                    last_eval = self._log_eval(log)
                if every_ckpt and self.step % every_ckpt == 0:
                    self.save_checkpoint()
            if self.eval_examples and (last_eval is None or self.step % max(every_eval, 1)):
                # Resumed from the last step's checkpoint, this evaluation is logged already.
                last_eval = log.eval_at(self.step) or self._log_eval(log)
            if (
                every_ckpt
                and not (checkpoint_dir(self.run_dir, self.step) / TRAINER_STATE).is_file()
            ):
                # The last step checkpointed: a crash while final/ is written costs no training.
                self.save_checkpoint()
        finally:
            bar.close()
            log.close()
        final = self._save_final(last_eval)
        return TrainResult(self.run_dir, final, self.step, history, last_eval)

    def _log_eval(self, log: MetricsLog) -> dict[str, float]:
        result = self.run_eval()
        log.write({"step": self.step, **{f"eval/{k}": v for k, v in result.items()}})
        if self.on_policy is not None:  # every process saw the same (reduced) loss
            self.on_policy.observe(result["ce"])
        return result

    def _save_final(self, last_eval: dict[str, float] | None) -> Path:
        final = self.run_dir / "final"
        lora = self.config.student.lora is not None
        # Every process takes part: under FSDP the full weights are gathered onto the main process
        # (on one process or DDP this is the module's own state dict).
        state = None if lora else self.accelerator.get_state_dict(self.module)
        if self.main:
            student = self.accelerator.unwrap_model(self.module).student
            weights = state and {
                k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")
            }
            # Before final/: a whole final/ (what "trained" means) then always has its summary.
            write_json_atomic(
                self.run_dir / "summary.json", {**self.info, "steps": self.step, "eval": last_eval}
            )
            save_student(student, self.tokenizer, final, state_dict=weights)
        self.accelerator.wait_for_everyone()
        return final


def _apply_liger(student: torch.nn.Module, device: torch.device) -> None:
    """Liger-Kernel's Triton kernels for the student's RMSNorm, RoPE and SwiGLU, patched into this
    instance only (the teacher keeps its own layers). Its loss kernels stay off: the LM head and
    the distillation loss are `losses.fused`'s."""
    if device.type != "cuda":
        raise UserError(
            f"student.liger: Liger's kernels need a CUDA device; this run is on {device}"
        )
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise UserError(
            "student.liger: the liger-kernel package is not installed (pip install liger-kernel)"
        ) from None
    _apply_liger_kernel_to_instance(
        model=student,
        rope=True,
        rms_norm=True,
        swiglu=True,
        cross_entropy=False,
        fused_linear_cross_entropy=False,
    )


def train(config: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Run (or with `resume`, continue) the training run described by `config`."""
    return Trainer(config, resume=resume).run()


def is_trained(run_dir: str | Path) -> bool:
    """Whether the run finished: its final model is saved whole (see `lmdistill.store.dir_state`;
    a final/ that an interrupted save left is not)."""
    return dir_state(Path(run_dir) / "final") == "whole"


def train_unless_done(config: TrainConfig) -> TrainResult | None:
    """Finish `config`'s run: nothing when it is already trained (None), else train, continuing
    from the latest checkpoint of an interrupted run."""
    if is_trained(config.run_dir):
        return None
    return train(config, resume=latest_checkpoint(Path(config.run_dir)) is not None)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def _is_last_step(checkpoint: Path) -> bool:
    """Whether `checkpoint` was saved at the end of training (checkpoints of older versions do
    not say, and count as not)."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    return "total_steps" in state and state["step"] >= state["total_steps"]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (its trainer_state.json is written last), or None."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    complete = sorted(p for p in root.iterdir() if (p / TRAINER_STATE).is_file())
    return complete[-1] if complete else None


class MetricsLog:
    """metrics.jsonl (one JSON object per step or evaluation) and TensorBoard when installed.

    On resume, records after the checkpoint's step are dropped first (the resumed run writes them
    again, so the file holds one uninterrupted curve), and so is a torn last line, which is what
    a crash while a line was written leaves (with one warning line)."""

    def __init__(self, run_dir: Path, *, enabled: bool, keep_until: int, tensorboard: bool) -> None:
        self.enabled = enabled
        self.handle = None
        self.writer = None
        self.evals: dict[int, dict[str, float]] = {}  # step -> the evaluation logged at it
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        kept = [r for r in _read_metrics(path) if r["step"] <= keep_until] if keep_until else []
        for record in kept:
            self._remember(record)
        # Rewritten whole: a crash now leaves the old file (still valid to resume from).
        write_jsonl_atomic(path, kept)
        self.handle = path.open("a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional; asked for, its absence is said once
                say(
                    "log.tensorboard: the tensorboard package is not installed, so no event files "
                    "are written (pip install tensorboard, or set log.tensorboard: false)"
                )

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        # Tests only: die with half of this line on disk, as a kill -9 during the write leaves.
        crash_point("metrics-line", before=lambda: self._append(line[: len(line) // 2]))
        self._append(line)
        self._remember(record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.writer.add_scalar(key, value, record["step"])

    def eval_at(self, step: int) -> dict[str, float] | None:
        """The evaluation logged at `step` (also by the run this one resumes), or None."""
        return self.evals.get(step)

    def _append(self, text: str) -> None:
        self.handle.write(text)
        self.handle.flush()

    def _remember(self, record: dict[str, Any]) -> None:
        scores = {k.removeprefix("eval/"): v for k, v in record.items() if k.startswith("eval/")}
        if scores:
            self.evals[record["step"]] = scores

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        if self.writer is not None:
            self.writer.close()


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's records, a torn last line dropped; one without an integer step (not
    written by this loop) is an error naming its line."""
    records = read_jsonl_tolerant(path)
    for number, record in records:
        if not isinstance(record.get("step"), int):
            raise InputError(path, "expected an integer", line=number, field="step")
    return [record for _, record in records]


def _progress_bar(total: int, initial: int, *, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


@contextlib.contextmanager
def _quiet(logger: str):
    """Hide one library logger's warnings for the duration."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _cpu_only() -> bool:
    """True on a machine without an accelerator. Accelerate sets up multi-process CPU training
    (gloo) only when told it runs on CPU; without this, processes started by torchrun or
    `accelerate launch --multi_gpu` on a CPU-only machine would each train alone."""
    from accelerate.utils import is_mps_available, is_npu_available, is_xpu_available

    return not (
        torch.cuda.is_available() or is_xpu_available() or is_npu_available() or is_mps_available()
    )


def _mixed_precision(precision: str) -> str:
    """'auto': bf16 on a GPU that has it, fp16 on an older GPU, none on CPU (CPU bf16 autocast is
    slower than float32 for these matmul sizes and would break bitwise resume tests)."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _adamw(module: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW without weight decay on vectors (norm weights, biases), as is standard for LMs."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    o = config.optim
    groups = [
        {"params": decay, "weight_decay": o.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel does the whole update in one pass over the parameters; the default
    # per-tensor loop makes ~10 passes, which on CPU took a third of a small student's step.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=o.lr, betas=o.betas, eps=o.eps, fused=fused
    )


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text()) or {}
