"""Peak memory and time of the fused distillation loss against the materialized textbook loss and
Liger-Kernel's chunked LigerFusedLinearJSDLoss, forward + backward, float32 on CPU.

Each measurement runs in a fresh subprocess: inputs (hidden states and LM heads) are allocated first,
the kernel's peak-RSS counter is reset (/proc/self/clear_refs), and the figure reported is the peak
RSS *above* the inputs during one forward + backward. The child's address space is capped below the
machine's free memory so that a reference that cannot fit fails with an allocation error instead of
waking the OOM killer.

    .venv/bin/python bench/loss_memory.py              # all shapes (about 6 minutes on 2 cores)
    .venv/bin/python bench/loss_memory.py --quick      # N=2048, V=32000 only

Comparisons, each at the same shapes and with the same work:
- fused vs reference: forward KL at T=2 with alpha=0.5 (the design document's formula, with the
  padding mask fixed). No padding in the labels, so skipping padded rows gives the fused loss no
  advantage here.
- fused vs Liger: generalized JSD (beta=0.5) + CE, alpha=0.5, T=1 (Liger applies no T^2, so T=1
  makes the two losses identical; the child asserts the values agree). Liger runs its plain-torch
  path (compiled=False): torch.compile on CPU would add minutes of compilation to each run.

- fused vs the matmul floor (issue #20): the four LM-head matmuls alone (student logits,
  teacher logits, and the two gradient products grad_hidden = G W and grad_W = G^T h), at the
  same shapes, dtype and chunk size as the fused loss (`default_chunk_size(V)` rows at a time,
  into reused buffers): no loss can take less time with this chunking. `time_vs_floor` = fused
  forward-KL seconds / floor seconds; the floor row also gives its GFLOP/s
  (8 N V H FLOP in all).

The last line printed is one JSON object: memory_ratio and time_ratio (fused / reference at N=8192,
V=32000), vs_liger_memory and vs_liger_time (fused / Liger at the same shape), time_vs_floor at
that shape and time_vs_floor_by_shape, and every row.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

H = 1024
SHAPES = [(2048, 32000), (8192, 32000), (2048, 128256), (8192, 128256)]
HEADLINE = (8192, 32000)
KINDS = ("floor", "reference", "fused", "fused_jsd", "liger_jsd")
GIB = 1024**3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _make_inputs(n: int, v: int):
    import torch

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, H, generator=g).requires_grad_(True)
    weight = (torch.randn(v, H, generator=g) * 0.02).requires_grad_(True)
    t_hidden = torch.randn(n, H, generator=g)
    t_weight = torch.randn(v, H, generator=g) * 0.02
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, t_hidden, t_weight, labels


def _reference(hidden, weight, t_hidden, t_weight, labels):
    """The design document's loss, materialized, with the padding mask fixed."""
    import torch.nn.functional as F

    T, alpha = 2.0, 0.5
    student = hidden @ weight.T
    teacher = t_hidden @ t_weight.T
    mask = (labels != -100).float()
    teacher_probs = F.softmax(teacher / T, dim=-1)
    student_log_probs = F.log_softmax(student / T, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_probs, reduction="none").sum(-1)
    ce = F.cross_entropy(student, labels, reduction="none", ignore_index=-100)
    per_token = alpha * kl * T**2 + (1 - alpha) * ce
    return (per_token * mask).sum() / mask.sum()


def _floor(hidden, weight, t_hidden, t_weight, labels):
    """The fused loss's four matmuls alone, chunk by chunk into reused buffers (module docstring).
    Returns a scalar so that it is timed like the losses (its backward is a no-op)."""
    import torch

    from lmdistill.losses.fused import default_chunk_size

    n, v = hidden.shape[0], weight.shape[0]
    rows = default_chunk_size(v)
    with torch.no_grad():
        z = torch.empty(min(rows, n), v)
        t = torch.empty(min(rows, n), v)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            h = hidden[start:stop]
            torch.matmul(h, weight.T, out=z[: stop - start])
            torch.matmul(t_hidden[start:stop], t_weight.T, out=t[: stop - start])
            torch.matmul(z[: stop - start], weight, out=grad_hidden[start:stop])
            grad_weight.addmm_(z[: stop - start].T, h)
    return (grad_hidden[0, 0] + grad_weight[0, 0]).requires_grad_(True)


def _loss_fn(kind: str):
    from lmdistill.losses import fused_distillation_loss

    if kind == "floor":
        return _floor
    if kind == "reference":
        return _reference
    if kind == "fused":
        return lambda *a: fused_distillation_loss(*a, temperature=2.0, alpha=0.5)
    if kind == "fused_jsd":
        return lambda *a: fused_distillation_loss(
            *a, divergence="jsd", beta=0.5, temperature=1.0, alpha=0.5
        )
    if kind == "liger_jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(
            weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, temperature=1.0, compiled=False
        )
        return lambda h, w, th, tw, lab: liger(h, w, th, tw, lab)
    raise ValueError(kind)


def child(kind: str, n: int, v: int) -> dict:
    import torch

    torch.manual_seed(0)
    inputs = _make_inputs(n, v)
    fn = _loss_fn(kind)
    torch.randn(64, 64) @ torch.randn(64, 64)  # load the BLAS kernels before timing
    base_kib = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    start = time.perf_counter()
    loss = fn(*inputs)
    loss.backward()
    seconds = time.perf_counter() - start
    peak_kib = _status_kib("VmHWM")
    return {
        "kind": kind,
        "N": n,
        "V": v,
        "seconds": round(seconds, 3),
        "peak_extra_gib": round((peak_kib - base_kib) / 1024**2, 4),
        "loss": float(loss),
    }


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 16 * GIB


def run_child(kind: str, n: int, v: int, cap_bytes: int) -> dict:
    """One measurement in a fresh process, with its address space capped at `cap_bytes`."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))

    cmd = [sys.executable, __file__, "--child", kind, str(n), str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
        reason = "cannot allocate" if "alloc" in tail.lower() or proc.returncode < 0 else tail
        return {"kind": kind, "N": n, "V": v, "error": reason[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or "error" in a or "error" in b:
        return None
    return round(a[key] / b[key], 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=3, metavar=("KIND", "N", "V"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="only N=2048, V=32000")
    parser.add_argument("--no-liger", action="store_true", help="skip Liger-Kernel")
    args = parser.parse_args()
    if args.child:
        kind, n, v = args.child
        print(json.dumps(child(kind, int(n), int(v))))
        return

    shapes = [(2048, 32000)] if args.quick else SHAPES
    kinds = [k for k in KINDS if not (args.no_liger and k == "liger_jsd")]
    # Leave 1.5 GiB for the rest of the machine; a reference that needs more fails cleanly.
    cap = _available_bytes() - int(1.5 * GIB)
    print(
        f"H={H}, float32, CPU threads={os.cpu_count()}, child address-space cap {cap / GIB:.1f} GiB"
    )
    rows: list[dict] = []
    print(f"{'kind':<10} {'N':>6} {'V':>7} {'seconds':>9} {'peak extra GiB':>15}  loss")
    for n, v in shapes:
        for kind in kinds:
            row = run_child(kind, n, v, cap)
            rows.append(row)
            if "error" in row:
                print(f"{kind:<10} {n:>6} {v:>7} {'-':>9} {'-':>15}  {row['error']}")
            else:
                print(
                    f"{kind:<10} {n:>6} {v:>7} {row['seconds']:>9.2f} "
                    f"{row['peak_extra_gib']:>15.3f}  {row['loss']:.6f}",
                    flush=True,
                )

    def get(kind: str, shape: tuple[int, int]) -> dict | None:
        return next((r for r in rows if r["kind"] == kind and (r["N"], r["V"]) == shape), None)

    print("\nratios (fused / baseline; below 1 is better)")
    floors = {}
    for shape in shapes:
        floor = get("floor", shape)
        floors[f"{shape[0]}x{shape[1]}"] = _ratio(get("fused", shape), floor, "seconds")
        if floor and "error" not in floor:
            gflops = 8 * shape[0] * shape[1] * H / floor["seconds"] / 1e9
            print(
                f"N={shape[0]:>5} V={shape[1]:>6}: matmul floor {floor['seconds']:.2f} s "
                f"({gflops:.0f} GFLOP/s), time_vs_floor {floors[f'{shape[0]}x{shape[1]}']}"
            )
    for shape in shapes:
        mem = _ratio(get("fused", shape), get("reference", shape), "peak_extra_gib")
        tim = _ratio(get("fused", shape), get("reference", shape), "seconds")
        lmem = _ratio(get("fused_jsd", shape), get("liger_jsd", shape), "peak_extra_gib")
        ltim = _ratio(get("fused_jsd", shape), get("liger_jsd", shape), "seconds")
        print(
            f"N={shape[0]:>5} V={shape[1]:>6}: vs reference memory {mem} time {tim}; "
            f"vs Liger memory {lmem} time {ltim}"
        )
        fj, lj = get("fused_jsd", shape), get("liger_jsd", shape)
        if fj and lj and "error" not in fj and "error" not in lj:
            drift = abs(fj["loss"] - lj["loss"]) / abs(lj["loss"])
            assert drift < 1e-4, f"fused and Liger disagree on the loss value ({drift:.2e})"

    headline = HEADLINE if HEADLINE in shapes else shapes[0]
    result = {
        "shape": {"N": headline[0], "V": headline[1], "H": H},
        "memory_ratio": _ratio(
            get("fused", headline), get("reference", headline), "peak_extra_gib"
        ),
        "time_ratio": _ratio(get("fused", headline), get("reference", headline), "seconds"),
        "vs_liger_memory": _ratio(
            get("fused_jsd", headline), get("liger_jsd", headline), "peak_extra_gib"
        ),
        "vs_liger_time": _ratio(get("fused_jsd", headline), get("liger_jsd", headline), "seconds"),
        "time_vs_floor": _ratio(get("fused", headline), get("floor", headline), "seconds"),
        "time_vs_floor_by_shape": floors,
        "rows": rows,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
