#!/usr/bin/env bash
# bench/gpu_check.sh: is lmdistill ready for a GPU? (issue 13, item 7). One short script:
#
#   1. loss: the fused distillation loss against Liger-Kernel's LigerFusedLinearJSDLoss at
#      N=8192 rows x V=128256 (Llama 3's vocabulary), H=4096, bf16 inputs, forward + backward:
#      milliseconds, peak CUDA memory above the inputs, and the two values (they must agree:
#      generalized JSD beta=0.5 + CE, alpha=0.5, T=1).
#   2. kd_step: lmdistill's real training loop, logit KD with the teacher online, a 0.5B student
#      and a 1.5B teacher built from Qwen2.5-0.5B / -1.5B-shaped configs with random weights
#      (no download), 8192-token micro-batches of packed 1024-token rows, precision auto (bf16
#      autocast), the attention transformers picks (SDPA); tokens/s over 3 steps after a warm-up,
#      peak CUDA memory.
#
# It prints one JSON line. Without CUDA each part says {"skipped": "needs CUDA"} at once; with
# --smoke (what tests/test_gpu_check.py runs on CPU) both parts run at a tiny size on the CPU so
# the code path is checked. Needs the bundled teacher's tokenizer (make install) and, for part 1,
# `pip install -e '.[bench]'` (liger-kernel; without it that comparison is skipped).
#
#   bash bench/gpu_check.sh            # on a GPU machine: ~2-4 minutes (writes ~8 GB of weights to a temp dir)
#   bash bench/gpu_check.sh --smoke    # on CPU: seconds
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" - "$@" <<'PY'
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

SMOKE = "--smoke" in sys.argv[1:]
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def peak_reset():
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def peak_gib(base):
    if not CUDA:
        return None  # CPU peaks are measured elsewhere (bench/loss_memory.py, tests/test_planner.py)
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)


def loss_check():
    from lmdistill.losses import fused_distillation_loss

    n, v, h = (8192, 128256, 4096) if CUDA else (256, 1024, 64)
    dtype = torch.bfloat16 if CUDA and torch.cuda.is_bf16_supported() else torch.float32
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def inputs():
        make = lambda *s: (torch.randn(*s, generator=g, device=DEVICE) * 0.02).to(dtype)  # noqa: E731
        hidden = make(n, h).requires_grad_()
        return hidden, make(v, h).requires_grad_(), make(n, h), make(v, h), torch.randint(v, (n,), device=DEVICE, generator=g)

    kinds = {"fused": lambda *a: fused_distillation_loss(*a, divergence="jsd", beta=0.5, temperature=1.0, alpha=0.5)}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, temperature=1.0, compiled=CUDA)
        kinds["liger"] = lambda *a: liger(*a)
    except ImportError:
        pass
    out = {"shape": [n, v, h], "dtype": str(dtype).removeprefix("torch.")}
    for name, fn in kinds.items():
        args = inputs()
        fn(*args).backward()  # warm-up (and torch.compile for Liger)
        args = inputs()
        base = peak_reset()
        started = time.perf_counter()
        value = fn(*args)
        value.backward()
        if CUDA:
            torch.cuda.synchronize()
        out[name] = {"ms": round(1000 * (time.perf_counter() - started), 1), "peak_gib": peak_gib(base), "value": round(float(value), 5)}
        del args, value
    if "liger" not in kinds:
        out["liger"] = {"skipped": "liger-kernel not installed (pip install -e '.[bench]')"}
    elif CUDA:
        out["fused_vs_liger"] = {k: round(out["fused"][k] / out["liger"][k], 3) for k in ("ms", "peak_gib")}
    return out


def kd_step():
    from transformers import AutoTokenizer

    from lmdistill.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m-instruct"))
    if CUDA:  # Qwen2.5-0.5B and -1.5B shapes (vocabulary 151,936; the tokenizer uses its first 49k)
        shapes = {"student": (896, 4864, 24, 14, 2), "teacher": (1536, 8960, 28, 12, 2)}
        vocab, tokens, max_length, records = 151936, 8192, 1024, 256
    else:
        shapes = {"student": (64, 128, 2, 4, 2), "teacher": (96, 192, 3, 4, 2)}
        vocab, tokens, max_length, records = len(tokenizer), 1024, 256, 32
    work = Path(tempfile.mkdtemp(prefix="lmdistill-gpu-check-"))
    try:
        return _kd_step(work, tokenizer, shapes, vocab, tokens, max_length, records)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # ~8 GB of random weights on a GPU machine


def _kd_step(work, tokenizer, shapes, vocab, tokens, max_length, records):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lmdistill.training.config import TrainConfig
    from lmdistill.training.loop import Trainer

    sizes = {}
    for role, (hidden, inter, layers, heads, kv) in shapes.items():
        config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True)
        model = Qwen2ForCausalLM(config)
        sizes[role] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(work / role)
        tokenizer.save_pretrained(work / role)
        del model
    words = "the teacher explains a long answer about rivers light numbers and cells".split()
    with (work / "data.jsonl").open("w") as out:
        for i in range(records):
            text = " ".join(words[(i + j) % len(words)] for j in range(max_length // 2))
            out.write(json.dumps({"prompt": f"Question {i}: explain.", "response": text}) + "\n")
    config = TrainConfig.model_validate({
        "run_dir": str(work / "run"),
        "student": {"model": str(work / "student")},
        "teacher": {"model": str(work / "teacher")},
        "data": {"path": str(work / "data.jsonl"), "max_length": max_length, "eval_fraction": 0},
        "batch": {"tokens_per_micro_batch": tokens},
        "objectives": [{"kind": "logits", "temperature": 1.0, "alpha": 0.5}],
        "optim": {"steps": 4},
        "log": {"progress": False, "tensorboard": False},
    })
    trainer = Trainer(config)
    student = trainer.accelerator.unwrap_model(trainer.module).student
    trainer.train_step(trainer.step_batches(0))  # warm-up: allocator, kernels
    base = peak_reset()
    started, real = time.perf_counter(), 0
    for step in range(1, 4):
        real += trainer.train_step(trainer.step_batches(step))["tokens"]
    if CUDA:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "student_params": sizes["student"], "teacher_params": sizes["teacher"],
        "mixed_precision": trainer.accelerator.mixed_precision,
        "attention": getattr(student.config, "_attn_implementation", None),
        "tokens_per_s": round(real / seconds, 1), "peak_gib": peak_gib(base), "micro_batch_tokens": tokens,
    }


result = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__, "smoke": SMOKE and not CUDA}
for name, part in (("loss", loss_check), ("kd_step", kd_step)):
    result[name] = part() if CUDA or SMOKE else {"skipped": "needs CUDA"}
print(json.dumps(result))
PY
