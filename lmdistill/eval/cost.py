"""What a model costs to keep and to run, measured on this machine: the "cost reduction" half
of the design document's table, as ratios teacher / student.

  params_total          unique parameters (tied input/output embeddings counted once)
  params_non_embedding  without token, position and (untied) output embeddings, the count that
                        scaling laws use (Kaplan et al. 2020, sec. 1.2)
  disk_bytes            the model dir's files as loaded (for the bundled teacher: the float32
                        safetensors converted from its GGUF, not the 4-bit GGUF itself)
  model_memory_bytes    peak resident memory while generating, less the process's memory before
                        the model was loaded (Python, torch and transformers: ~0.4 GB that every
                        model pays alike and that would blur the ratio); `peak_rss_bytes` is the
                        whole process; on a GPU also `cuda_peak_allocated_bytes`
  latency_per_token_s   time per generated token at batch size 1 (prefill included): the mean
                        over the prompts, best of `repeats` rounds
  tokens_per_s          generated tokens per second for a batch of `batch_size` prompts, best of
                        `repeats` rounds

Timing runs in a fresh subprocess per model (`python -m lmdistill.eval.cost SPEC`): memory peaks
are then the model's own, not left over from whatever the evaluation loaded before, and every
model meets the same cold start. Every model decodes exactly `new_tokens` tokens greedily from
the same prompts (end-of-turn suppressed until then), so a model that answers briefly is not
rewarded with a shorter, cheaper run. Timings take the best round because other load on the
machine only ever adds time (the reasoning behind `timeit`'s advice to read the minimum); they
remain noisy on a shared machine, so compare models measured in the same run.

API spend: the tokens each model used during the evaluation at the given prices (USD per
million input / output tokens); the prices are the teacher's when there is one, else the
evaluated model's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lmdistill.errors import UserError
from lmdistill.teachers.base import Prices

# Short held-out prompts of the bundled prompt set: the same for every model.
COST_PROMPTS: tuple[str, ...] = (
    "What is the capital of Germany?",
    "Explain why the sky is blue in one or two sentences.",
    "Give two tips for learning a language.",
    "Define the word 'gravity' in one sentence.",
)
DEFAULT_NEW_TOKENS = 32
DEFAULT_REPEATS = 2
_PROBE_TIMEOUT_S = 1800


def count_parameters(model: Any) -> tuple[int, int]:
    """(all unique parameters, those outside embeddings) of a torch module.

    Embeddings are every `nn.Embedding` (tokens, learned positions) plus the output projection
    when it is not tied to the input embedding. Shared tensors count once."""
    import torch

    seen: set[int] = set()
    total = 0
    for param in model.parameters():  # parameters() already yields a tied tensor once
        seen.add(id(param))
        total += param.numel()
    embedding: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            embedding[id(module.weight)] = module.weight.numel()
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is not None:
        embedding[id(output.weight)] = output.weight.numel()
    in_model = sum(n for key, n in embedding.items() if key in seen)
    return total, total - in_model


def dir_size(path: Path) -> int:
    """Bytes of the files under `path` (hidden and lock files aside, as the fingerprint does)."""
    return sum(
        p.stat().st_size
        for p in path.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and p.suffix != ".lock"
    )


# --------------------------------------------------------------------------- memory (Linux)
def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where unsupported.
    Writing 5 to clear_refs does exactly that (Linux >= 4.0, Documentation/filesystems/proc)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_bytes() -> tuple[int, str]:
    """(peak RSS, its scope): "generation" after a reset, else "process" (ru_maxrss, which
    counts since the process started: loading included)."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024, "generation"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak if sys.platform == "darwin" else peak * 1024), "process"


# ------------------------------------------------------------------------------- the probe
def probe(spec: str, *, new_tokens: int, batch_size: int, repeats: int) -> dict[str, Any]:
    """Load `spec` in this process and measure it (run this in a fresh subprocess: see the
    module docstring). Returns the measurements as a JSON-able dict."""
    import torch
    from transformers import GenerationConfig

    from lmdistill.eval.cache import model_dir
    from lmdistill.teachers.local import HFTeacher, left_pad
    from lmdistill.teachers.registry import load_teacher

    rss_before = (_status_kb("VmRSS") or 0) * 1024  # torch and transformers already imported
    started = time.perf_counter()
    teacher = load_teacher(spec)
    if not isinstance(teacher, HFTeacher):
        raise UserError(f"model '{spec}' is not a local model: nothing to measure")
    load_s = time.perf_counter() - started
    rss_loaded = (_status_kb("VmRSS") or 0) * 1024
    total, non_embedding = count_parameters(teacher.model)
    prompts = [teacher.encode_chat([{"role": "user", "content": p}]) for p in COST_PROMPTS]
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        repetition_penalty=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # suppresses end-of-turn: every model decodes the same count
        eos_token_id=teacher.eos_ids,
        pad_token_id=teacher.pad_id,
    )
    device = teacher.device

    def decode(rows: list[list[int]]) -> float:
        ids, mask = left_pad(rows, teacher.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()  # time the work, not the launch
        t0 = time.perf_counter()
        with torch.no_grad():
            out = teacher.model.generate(
                input_ids=ids, attention_mask=mask, generation_config=config
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        assert out.shape[1] - ids.shape[1] == new_tokens, "decoded a different number of tokens"
        return elapsed

    decode(prompts[:1])  # warm-up: first-call allocations and kernel selection are not the model
    reset = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rounds = [
        sum(decode([p]) for p in prompts) / (len(prompts) * new_tokens) for _ in range(repeats)
    ]
    batch = [prompts[i % len(prompts)] for i in range(batch_size)]
    batch_time = min(decode(batch) for _ in range(repeats))
    peak, scope = _peak_rss_bytes()
    path = model_dir(spec)
    out: dict[str, Any] = {
        "params_total": total,
        "params_non_embedding": non_embedding,
        "disk_bytes": dir_size(path) if path is not None else None,
        "dtype": str(next(teacher.model.parameters()).dtype).removeprefix("torch."),
        "device": str(device),
        "load_s": load_s,
        "rss_before_load_bytes": rss_before,
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": peak,
        "peak_rss_scope": scope if reset else "process",
        "model_memory_bytes": peak - rss_before if rss_before else None,
        "latency_per_token_s": min(rounds),
        "tokens_per_s": batch_size * new_tokens / batch_time,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        out["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def machine() -> dict[str, Any]:
    """What the timings were measured on."""
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def measure(
    spec: str,
    *,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    batch_size: int = 8,
    repeats: int = DEFAULT_REPEATS,
) -> dict[str, Any]:
    """`probe(spec)` in a fresh subprocess (see the module docstring)."""
    command = [
        sys.executable,
        "-m",
        "lmdistill.eval.cost",
        spec,
        f"--new-tokens={new_tokens}",
        f"--batch-size={batch_size}",
        f"--repeats={repeats}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=_PROBE_TIMEOUT_S)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        raise UserError(f"measuring the cost of '{spec}' failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# Ratios that say "how many times cheaper the student is": teacher / student for amounts,
# student / teacher for throughput.
_REDUCTIONS: tuple[tuple[str, str, bool], ...] = (
    ("params", "params_total", False),
    ("non_embedding_params", "params_non_embedding", False),
    ("disk", "disk_bytes", False),
    ("model_memory", "model_memory_bytes", False),
    ("latency_per_token", "latency_per_token_s", False),
    ("throughput", "tokens_per_s", True),
    ("api_spend", "spend_usd", False),
)


def reductions(teacher: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """How many times cheaper (or faster) `other` is than `teacher`, per measured quantity."""
    out = {}
    for name, key, inverted in _REDUCTIONS:
        t, o = teacher.get(key), other.get(key)
        if isinstance(t, int | float) and isinstance(o, int | float) and t > 0 and o > 0:
            out[name] = o / t if inverted else t / o
    return out


def cost_report(
    measured: dict[str, dict[str, Any]],
    tokens: dict[str, tuple[int, int]],
    prices: Prices | None,
    priced_role: str,
) -> dict[str, Any]:
    """The report's "cost" section: per role the measurements, its evaluation tokens and (for
    `priced_role`) the spend at `prices`; ratios against the teacher; the machine."""
    models: dict[str, dict[str, Any]] = {}
    for role, data in measured.items():
        prompt_tokens, completion_tokens = tokens.get(role, (0, 0))
        entry = {
            **data,
            "eval_prompt_tokens": prompt_tokens,
            "eval_completion_tokens": completion_tokens,
        }
        if prices is not None and role == priced_role:
            entry["spend_usd"] = prices.cost(prompt_tokens, completion_tokens)
        models[role] = entry
    report: dict[str, Any] = {"models": models, "machine": machine()}
    if prices is not None:
        report["prices"] = {
            "input_per_m": prices.input_per_m,
            "output_per_m": prices.output_per_m,
            "applies_to": priced_role,
        }
    if "teacher" in models:
        report["reduction"] = {
            role: reductions(models["teacher"], data)
            for role, data in models.items()
            if role != "teacher"
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure one model's cost; prints JSON.")
    parser.add_argument("spec")
    parser.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS)
    args = parser.parse_args(argv)
    try:
        result = probe(
            args.spec, new_tokens=args.new_tokens, batch_size=args.batch_size, repeats=args.repeats
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
