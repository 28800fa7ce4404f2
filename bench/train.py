"""Training throughput, measured side by side in one run on this machine:

1. logit KD, lmdistill's loop vs TRL's GKDTrainer: real (non-padding) tokens per second on the same
   work: the same teacher and student, the same data, sequence length and batch, forward KL at T=1
   on the assistant tokens (GKD with lmbda=0, i.e. off-policy only, and beta=0, which is
   KL(teacher || student); its `temperature` is only a sampling temperature and it applies no T^2,
   hence T=1). The batch: TRL takes --batch examples padded to the longest; lmdistill takes a token
   budget of --batch x --max-length (the same padded capacity) and packs examples into it.
2. offline vs online teacher: lmdistill's steps/s with the teacher's top-32 from a cache against
   running the teacher every step, the teacher 4.1x the student in all parameters (7.9x without
   the embeddings).
3. the cache's size in bytes per token at k=32.

Models: the teacher is the bundled SmolLM2-135M-Instruct (30 layers, 135M parameters); the student
is cut from it by `student_from_teacher` (8 of its layers, hidden size 396, MLP 896: 33M
parameters), so the teacher is 4x the student in parameters and both share the 49,152-token
vocabulary. The size ratio is taken over all parameters: with a vocabulary this large the
embedding and LM head are most of a small model's compute, so a teacher with 4x the student's
*non-embedding* parameters costs far less than 4x per token. Data: the bundled teacher's answers to
the bundled training prompts (generated once into --work-dir; ~10 minutes on 2 busy cores).

    .venv/bin/python bench/train.py                 # about 5 minutes on 2 cores
    .venv/bin/python bench/train.py --steps 4       # quicker, noisier

Needs the bench extra (`pip install -e '.[bench]'`: trl). The first step of every trainer is a
warm-up and is not timed; each trainer runs --repeats times, interleaved with the others, and its
best run counts (other processes on a shared machine only ever slow a run down). The last line printed is one JSON object with kd_vs_trl,
cached_vs_online, cache_bytes_per_token and the measurements behind them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "lmdistill" / "assets" / "prompts.jsonl"
TEACHER = "smollm2-135m-instruct"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "bench-train"))
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per trainer")
    p.add_argument(
        "--repeats", type=int, default=2, help="runs per trainer, interleaved; best kept"
    )
    p.add_argument("--batch", type=int, default=4, help="TRL examples per step")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--examples", type=int, default=64, help="training examples to generate")
    p.add_argument("--response-tokens", type=int, default=160)
    p.add_argument("--teacher-layers", type=int, default=0, help="0: the whole bundled teacher")
    p.add_argument("--student-layers", type=int, default=8)
    p.add_argument("--student-hidden", type=int, default=396, help="a multiple of 9 heads")
    p.add_argument("--student-mlp", type=int, default=896)
    p.add_argument("--top-k", type=int, default=32)
    return p.parse_args(argv)


def prepare_data(work: Path, args: argparse.Namespace) -> Path:
    """Records like `lmdistill generate` writes (messages + response), sampled once from the
    bundled teacher and kept in the work dir."""
    out = work / f"data-{args.examples}x{args.response_tokens}.jsonl"
    if out.is_file():
        return out
    from lmdistill.data.jsonl import iter_jsonl
    from lmdistill.teachers.base import SamplingParams
    from lmdistill.teachers.registry import load_teacher

    prompts = [r["prompt"] for _, r in iter_jsonl(PROMPTS) if r.get("split") == "train"][
        : args.examples
    ]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    teacher = load_teacher(TEACHER, device="cpu", batch_size=16)
    params = SamplingParams(temperature=0.7, max_tokens=args.response_tokens, seed=0)
    started = time.perf_counter()
    records = {}
    for result in teacher.iter_generate(conversations, params):
        if result.failure is None:
            records[result.index] = {
                "messages": conversations[result.index],
                "response": result.generations[0].text,
            }
    print(
        f"generated {len(records)} responses in {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
    )
    work.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(records[i]) + "\n" for i in sorted(records)))
    return out


def prepare_models(work: Path, args: argparse.Namespace) -> tuple[Path, Path, dict[str, float]]:
    """(teacher dir, student dir, their parameter counts)."""
    from lmdistill.training.students import (
        load_model_dir,
        non_embedding_parameters,
        resolve_model_dir,
        student_from_teacher,
    )

    teacher = resolve_model_dir(TEACHER)
    if args.teacher_layers:
        teacher = work / f"teacher-{args.teacher_layers}L"
        student_from_teacher(TEACHER, layers=args.teacher_layers, out_dir=teacher)
    student = work / f"student-{args.student_layers}L-{args.student_hidden}h-{args.student_mlp}m"
    student_from_teacher(
        TEACHER,
        layers=args.student_layers,
        hidden_size=args.student_hidden,
        intermediate_size=args.student_mlp,
        out_dir=student,
    )
    sizes = {}
    for role, path in (("teacher", teacher), ("student", student)):
        model, _ = load_model_dir(path)
        sizes[f"{role}_parameters"] = sum(p.numel() for p in model.parameters())
        sizes[f"{role}_non_embedding_parameters"] = non_embedding_parameters(model)
    return teacher, student, sizes


def run_lmdistill(
    work: Path, name: str, student: Path, data: Path, teacher: dict[str, str], args
) -> dict[str, Any]:
    """Real tokens/s and steps/s of lmdistill's loop, the warm-up step excluded."""
    from lmdistill.training.config import validate
    from lmdistill.training.loop import Trainer

    run_dir = work / "runs" / name
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    config = validate(
        {
            "run_dir": str(run_dir),
            "precision": "no",
            "student": {"model": str(student)},
            "teacher": teacher,
            "data": {"path": str(data), "max_length": args.max_length, "eval_fraction": 0.0},
            "batch": {
                "tokens_per_micro_batch": args.batch * args.max_length,
                "micro_batches_per_step": 1,
            },
            "objectives": [
                {"kind": "logits", "divergence": "forward_kl", "temperature": 1.0, "alpha": 1.0}
            ],
            "optim": {"lr": 1e-4, "steps": args.steps + 1, "schedule": "constant"},
            "log": {"progress": False, "tensorboard": False},
        },
        name,
    )
    history = Trainer(config).run().history[1:]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in history)
    tokens = sum(r["tokens"] for r in history)
    return {
        "real_tokens_per_s": tokens / seconds,
        "steps_per_s": len(history) / seconds,
        "real_tokens_per_step": tokens / len(history),
    }


def run_trl(work: Path, student: Path, teacher: Path, data: Path, args) -> dict[str, Any]:
    """Real tokens/s of TRL's GKDTrainer (lmbda=0, beta=0, T=1), the warm-up step excluded."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.experimental.utils import DataCollatorForChatML

    from lmdistill.data.jsonl import iter_jsonl
    from lmdistill.data.sft import conversation

    tokenizer = AutoTokenizer.from_pretrained(student)
    rows = [{"messages": conversation(r, data, line)} for line, r in iter_jsonl(data)]
    counts: list[tuple[int, int]] = []  # (real, padded) tokens of each batch, in order
    collator = DataCollatorForChatML(tokenizer=tokenizer, max_length=args.max_length)

    def counting_collator(examples):
        batch = collator(examples)
        counts.append((int(batch["attention_mask"].sum()), batch["attention_mask"].numel()))
        return batch

    step_ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs):
            step_ends.append(time.perf_counter())

    config = GKDConfig(
        output_dir=str(work / "runs" / "trl"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps + 1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        lmbda=0.0,
        beta=0.0,
        temperature=1.0,
        max_length=args.max_length,
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        report_to=[],
        logging_steps=10_000,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = GKDTrainer(
        model=AutoModelForCausalLM.from_pretrained(student),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher),
        args=config,
        data_collator=counting_collator,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    real = sum(c[0] for c in counts[1 : args.steps + 1])
    padded = sum(c[1] for c in counts[1 : args.steps + 1])
    seconds = step_ends[args.steps] - step_ends[0]
    return {
        "real_tokens_per_s": real / seconds,
        "steps_per_s": args.steps / seconds,
        "real_tokens_per_step": real / args.steps,
        "padding_fraction": 1 - real / padded,
    }


def build_cache(work: Path, teacher: Path, data: Path, args) -> dict[str, Any]:
    import shutil

    from lmdistill.teachers.cache import build_cache as build
    from lmdistill.teachers.local import HFTeacher

    out = work / "cache"
    shutil.rmtree(out, ignore_errors=True)
    report = build(
        HFTeacher(teacher, device="cpu"),
        data,
        out,
        top_k=args.top_k,
        max_length=args.max_length,
        tokens_per_batch=args.batch * args.max_length,
        progress=False,
    )
    return {
        "dir": str(out),
        "bytes_per_token": report.bytes_per_token,
        "positions": report.positions,
        "seconds": report.seconds,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work, args)
    teacher, student, sizes = prepare_models(work, args)
    size_ratio = sizes["teacher_parameters"] / sizes["student_parameters"]
    print(
        f"teacher {sizes['teacher_parameters'] / 1e6:.1f}M parameters, student "
        f"{sizes['student_parameters'] / 1e6:.1f}M: {size_ratio:.2f}x; torch threads "
        f"{torch.get_num_threads()}"
    )

    cache = build_cache(work, teacher, data, args)
    print(
        f"cache: k={args.top_k}, {cache['bytes_per_token']:.1f} bytes/token, built in {cache['seconds']:.0f} s"
    )
    # The machine is shared: another process can halve a trainer's speed for a while. Each
    # trainer runs --repeats times, interleaved, and the best of its runs is compared.
    trainers = {
        "online": lambda: run_lmdistill(
            work, "online", student, data, {"model": str(teacher)}, args
        ),
        "trl": lambda: run_trl(work, student, teacher, data, args),
        "cached": lambda: run_lmdistill(
            work, "cached", student, data, {"cache": cache["dir"]}, args
        ),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trainers}
    for _ in range(args.repeats):
        for name, run in trainers.items():
            runs[name].append({**run(), "loadavg_1min": os.getloadavg()[0]})
            last = runs[name][-1]
            print(
                f"{name:>7}: {last['real_tokens_per_s']:6.0f} real tokens/s, "
                f"{last['steps_per_s']:.3f} steps/s (load average {last['loadavg_1min']:.1f})"
            )
    online, trl, cached = (max(runs[n], key=lambda r: r["steps_per_s"]) for n in trainers)
    print(f"TRL GKDTrainer's batches: {trl['padding_fraction']:.0%} padding")

    result = {
        "kd_vs_trl": online["real_tokens_per_s"] / trl["real_tokens_per_s"],
        "cached_vs_online": cached["steps_per_s"] / online["steps_per_s"],
        "cache_bytes_per_token": cache["bytes_per_token"],
        "teacher_vs_student_params": size_ratio,
        "parameters": sizes,
        "lmdistill_online": online,
        "lmdistill_cached": cached,
        "trl_gkd": trl,
        "all_runs": runs,
        "settings": {
            k: getattr(args, k)
            for k in (
                "steps",
                "repeats",
                "batch",
                "max_length",
                "examples",
                "top_k",
                "teacher_layers",
                "student_layers",
                "student_hidden",
                "student_mlp",
            )
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
