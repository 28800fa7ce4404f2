"""What a model costs to keep and to run, measured on this machine: the "cost reduction" half
of the design document's table, as ratios teacher / student.

  params_total          unique parameters (tied input/output embeddings counted once)
  params_non_embedding  without token, position and (untied) output embeddings, the count that
                        scaling laws use (Kaplan et al. 2020, sec. 1.2)
  load_s                seconds to load the model (all models load at once, so it includes
                        their contention)
  disk_bytes            the model dir's files as loaded (for the bundled teacher: the float32
                        safetensors converted from its GGUF, not the 4-bit GGUF itself)
  model_memory_bytes    peak resident memory while generating, less the process's memory before
                        the model was loaded (Python, torch and transformers: ~0.4 GB that every
                        model pays alike and that would blur the ratio); `peak_rss_bytes` is the
                        whole process; on a GPU also `cuda_peak_allocated_bytes`
  latency_per_token_s   time per generated token at batch size 1 (prefill included): the mean
                        over the prompts, median of `rounds` rounds (each in `latency_rounds_s`)
  tokens_per_s          generated tokens per second for a batch of `batch_size` prompts, median
                        of `rounds` rounds (each in `tokens_per_s_rounds`)

Each model runs in its own subprocess (`python -m lmdistill.eval.cost SPEC --serve`): memory
peaks are then the model's own, not left over from whatever the evaluation loaded before, and
every model meets the same cold start. Every model decodes exactly `new_tokens` tokens greedily
from the same prompts (end-of-turn suppressed until then), so a model that answers briefly is not
rewarded with a shorter, cheaper run.

The models are timed interleaved (issue #20): all of them loaded and warm, then round after round
each model's latency round, then each model's batch round, the order reversed every other round.
Load from other jobs then falls on neighbouring rounds of both models alike, and a ratio is taken
per round (teacher round r / student round r) and reported as the median over the rounds with its
spread (lowest and highest round). Timing each model alone, one after the other, let a burst of
load during one of them flip the verdict: a quickstart evaluated beside other jobs measured its
student 0.56x as fast as the teacher. The 1-minute load average before and after, against the CPU
count, is stored; `noise(report)` says when the spread or the load make the figures doubtful.

Models of one shape (the same config.json, dtype included, but for names and versions: a student
before and after training, or trained two ways) cost the same to run, since each decodes the same
token count: the evaluation times one of them and the others carry its figures (`timed_as`),
with their own disk size.

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

import numpy as np

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
DEFAULT_ROUNDS = 5
_PROBE_TIMEOUT_S = 1800
_MARK = "@@lmdistill-cost "  # the worker's reply lines (libraries may print to stdout too)
# When to say the timings are doubtful: per-round ratios apart by more than this factor, or a
# 1-minute load average above this share of the CPUs (other jobs competing for them).
WIDE_SPREAD = 1.25
BUSY_LOAD_PER_CPU = 0.5


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


# config.json keys that name or date a model without changing what it computes.
_NAME_KEYS = frozenset({"_name_or_path", "name_or_path", "transformers_version"})


def shape_identity(spec: str) -> str | None:
    """What decides `spec`'s cost (module docstring): its config.json less names and versions,
    as canonical JSON; None for a model without a local config (an API model)."""
    from lmdistill.eval.cache import model_dir

    path = model_dir(spec)
    if path is None or not (path / "config.json").is_file():
        return None
    config = json.loads((path / "config.json").read_text())
    return json.dumps({k: v for k, v in config.items() if k not in _NAME_KEYS}, sort_keys=True)


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


# ------------------------------------------------------------------------------ the worker
def serve(spec: str, *, new_tokens: int, batch_size: int) -> None:
    """Load `spec` in this process (a fresh subprocess: see the module docstring), reply with its
    static measurements, then answer commands read from stdin, one per line: `latency` (one round
    of the prompts at batch 1), `batch` (one batched round), `done` (memory peaks; then exit).
    Replies are JSON lines after `_MARK` on stdout."""
    import torch
    from transformers import GenerationConfig

    from lmdistill.eval.cache import model_dir
    from lmdistill.teachers.local import HFTeacher, left_pad
    from lmdistill.teachers.registry import load_teacher

    def reply(data: dict[str, Any]) -> None:
        print(_MARK + json.dumps(data), flush=True)

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
    path = model_dir(spec)
    reply(
        {
            "params_total": total,
            "params_non_embedding": non_embedding,
            "disk_bytes": dir_size(path) if path is not None else None,
            "dtype": str(next(teacher.model.parameters()).dtype).removeprefix("torch."),
            "device": str(device),
            "load_s": load_s,
            "rss_before_load_bytes": rss_before,
            "rss_after_load_bytes": rss_loaded,
            "new_tokens": new_tokens,
            "batch_size": batch_size,
            "torch_threads": torch.get_num_threads(),
        }
    )
    batch = [prompts[i % len(prompts)] for i in range(batch_size)]
    for line in sys.stdin:
        command = line.strip()
        if command == "latency":
            seconds = sum(decode([p]) for p in prompts)
            reply({"latency_per_token_s": seconds / (len(prompts) * new_tokens)})
        elif command == "batch":
            reply({"tokens_per_s": batch_size * new_tokens / decode(batch)})
        elif command == "done":
            peak, scope = _peak_rss_bytes()
            done: dict[str, Any] = {
                "peak_rss_bytes": peak,
                "peak_rss_scope": scope if reset else "process",
                "model_memory_bytes": peak - rss_before if rss_before else None,
            }
            if device.type == "cuda":
                done["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            reply(done)
            return
        else:
            raise ValueError(f"unknown command {command!r}")


class _Worker:
    """One model in its own `serve` subprocess."""

    def __init__(self, spec: str, new_tokens: int, batch_size: int) -> None:
        import tempfile

        self.spec = spec
        # A file, not a pipe: a full pipe would block the worker. Closed in close().
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lmdistill.eval.cost",
                spec,
                "--serve",
                f"--new-tokens={new_tokens}",
                f"--batch-size={batch_size}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.static: dict[str, Any] = {}

    def ready(self) -> None:
        """Wait for the model to load and warm up; keep its static measurements."""
        self.static = self._read()

    def ask(self, command: str) -> dict[str, Any]:
        assert self._process.stdin is not None
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            if line.startswith(_MARK):
                return json.loads(line[len(_MARK) :])
        self._process.wait(timeout=_PROBE_TIMEOUT_S)
        self._stderr.seek(0)
        lines = [x for x in self._stderr.read().splitlines() if x.strip()]
        last = lines[-1] if lines else f"exit status {self._process.returncode}"
        raise UserError(f"measuring the cost of '{self.spec}' failed: {last}")

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._stderr.close()


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def measure_models(
    specs: dict[str, str],
    *,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    batch_size: int = 8,
    rounds: int = DEFAULT_ROUNDS,
) -> dict[str, Any]:
    """Time the models `specs` (role -> spec) interleaved, each in its own subprocess (module
    docstring). Returns {"models": {role: measurements}, "conditions": {load averages, CPUs,
    rounds}}."""
    if rounds < 1:
        raise UserError(f"cost rounds must be >= 1, got {rounds}")
    load_before = _load_average()
    workers: dict[str, _Worker] = {}
    try:
        for role, spec in specs.items():  # loading side by side; nothing is timed until all are
            workers[role] = _Worker(spec, new_tokens, batch_size)
        for worker in workers.values():
            worker.ready()
        latency: dict[str, list[float]] = {role: [] for role in specs}
        throughput: dict[str, list[float]] = {role: [] for role in specs}
        roles = list(specs)
        for r in range(rounds):
            order = roles if r % 2 == 0 else roles[::-1]
            for role in order:
                latency[role].append(workers[role].ask("latency")["latency_per_token_s"])
            for role in order:
                throughput[role].append(workers[role].ask("batch")["tokens_per_s"])
        models = {}
        for role, worker in workers.items():
            models[role] = {
                **worker.static,
                **worker.ask("done"),
                "latency_per_token_s": float(np.median(latency[role])),
                "tokens_per_s": float(np.median(throughput[role])),
                "latency_rounds_s": latency[role],
                "tokens_per_s_rounds": throughput[role],
            }
    finally:
        for worker in workers.values():
            worker.close()
    conditions = {
        "rounds": rounds,
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        "cpu_count": os.cpu_count(),
    }
    return {"models": models, "conditions": conditions}


def measure(
    spec: str,
    *,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    batch_size: int = 8,
    rounds: int = DEFAULT_ROUNDS,
) -> dict[str, Any]:
    """One model's measurements (`measure_models` of it alone)."""
    measured = measure_models(
        {"model": spec}, new_tokens=new_tokens, batch_size=batch_size, rounds=rounds
    )
    return measured["models"]["model"]


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


# Timings measured round by round: the ratio is the median of the per-round ratios.
_ROUNDS = {"latency_per_token": "latency_rounds_s", "throughput": "tokens_per_s_rounds"}


def _per_round(teacher: dict[str, Any], other: dict[str, Any], name: str) -> np.ndarray | None:
    """Per-round ratios (teacher round r against `other`'s round r), when both were timed in the
    same interleaved run."""
    key = _ROUNDS.get(name)
    t, o = teacher.get(key or ""), other.get(key or "")
    if not (isinstance(t, list) and isinstance(o, list) and len(t) == len(o) and t):
        return None
    t, o = np.asarray(t, dtype=float), np.asarray(o, dtype=float)
    if (t <= 0).any() or (o <= 0).any():
        return None
    return o / t if name == "throughput" else t / o


def reductions(teacher: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """How many times cheaper (or faster) `other` is than `teacher`, per measured quantity; for
    timings measured in rounds, the median of the per-round ratios."""
    out = {}
    for name, key, inverted in _REDUCTIONS:
        rounds = _per_round(teacher, other, name)
        if rounds is not None:
            out[name] = float(np.median(rounds))
            continue
        t, o = teacher.get(key), other.get(key)
        if isinstance(t, int | float) and isinstance(o, int | float) and t > 0 and o > 0:
            out[name] = o / t if inverted else t / o
    return out


def spreads(teacher: dict[str, Any], other: dict[str, Any]) -> dict[str, list[float]]:
    """[lowest, highest] per-round ratio of each timing measured in rounds."""
    out = {}
    for name in _ROUNDS:
        rounds = _per_round(teacher, other, name)
        if rounds is not None:
            out[name] = [float(rounds.min()), float(rounds.max())]
    return out


def noise(report: dict[str, Any], role: str, name: str) -> str | None:
    """Why the `name` ratio of `role` against the teacher in a cost report is doubtful (a wide
    spread across rounds, a spread on both sides of 1, a busy machine), or None."""
    reasons = []
    low, high = report.get("spread", {}).get(role, {}).get(name, (None, None))
    if low is not None and high is not None:
        if low < 1 < high:
            reasons.append(f"rounds disagree on which is faster ({low:.2f}x to {high:.2f}x)")
        elif high > WIDE_SPREAD * low:
            reasons.append(f"wide spread ({low:.2f}x to {high:.2f}x)")
    conditions = report.get("conditions", {})
    cpus = conditions.get("cpu_count") or 0
    loads = [
        x
        for x in (conditions.get("load_average_before"), conditions.get("load_average_after"))
        if isinstance(x, int | float)
    ]
    if cpus and loads and max(loads) > BUSY_LOAD_PER_CPU * cpus:
        reasons.append(f"busy machine (load average {max(loads):.1f} on {cpus} CPUs)")
    return "; ".join(reasons) or None


def cost_report(
    measured: dict[str, dict[str, Any]],
    tokens: dict[str, tuple[int, int]],
    prices: Prices | None,
    priced_role: str,
    conditions: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report's "cost" section: per role the measurements, its evaluation tokens and (for
    `priced_role`) the spend at `prices`; ratios against the teacher with the spread of the
    timed ones; the machine and its load while timing (`conditions`, from `measure_models`)."""
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
    if conditions is not None:
        report["conditions"] = conditions
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
        report["spread"] = {
            role: spreads(models["teacher"], data)
            for role, data in models.items()
            if role != "teacher"
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Measure models' cost, timed interleaved; prints JSON. With --serve: the "
        "worker subprocess of one model (commands on stdin)."
    )
    parser.add_argument("specs", nargs="+", metavar="SPEC")
    parser.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.serve:
            serve(args.specs[0], new_tokens=args.new_tokens, batch_size=args.batch_size)
            return 0
        measured = measure_models(
            {f"model{i}": spec for i, spec in enumerate(args.specs)},
            new_tokens=args.new_tokens,
            batch_size=args.batch_size,
            rounds=args.rounds,
        )
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(measured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
