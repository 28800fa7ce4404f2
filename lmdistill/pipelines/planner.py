"""`lmdistill plan`: what a recipe needs before GPUs are booked (issue 13, item 5). Memory per GPU
per stage under each strategy, whether it fits, tokens to process, hours at a stated MFU, and the
API spend of an API teacher. Model configs only: parameter counts come from the model built on the
`meta` device (exact for any architecture transformers knows; no weights are read or allocated).

Memory model, per GPU, of this repo's training loop (`lmdistill.training.loop`):

- student weights, gradients and AdamW moments: fp32 (Accelerate's mixed precision keeps fp32
  master weights and autocasts the matmuls): 4 + 4 + 8 = 16 bytes per parameter; FSDP shards all
  three over the GPUs.
- activations kept for the backward, per micro-batch token and decoder layer, in elements of the
  compute dtype: 7h + 2kv + 4i for a Llama-style layer (h hidden, kv key/value width, i MLP width:
  the layer input and norm output twice, the rotated q, k and v, the attention output and its
  projection input; the MLP's gate, activation, up and product), plus heads x T when attention
  runs on the math path (CPU with a packed mask keeps the (T, T) probabilities; SDPA's
  memory-efficient and flash kernels on a GPU keep none).
- loss chunks: the fused losses' four reused (rows, V) float32 buffers (`losses.fused`); an
  online teacher adds its final hidden states for the micro-batch.
- teacher: its weights in its dtype on every GPU (the loop does not shard it) when it runs online;
  none when its top-k come from the offline cache (the cache stage needs them, alone) or from a
  server (the server's own GPUs hold them).

Checked on this CPU machine against measured peaks of real runs (tests/test_planner.py); the GPU
figures (bf16, SDPA) follow the same model and have not been measured on a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmdistill.errors import UserError

GIB = 2**30
STRATEGIES = ("ddp", "fsdp")
TEACHER_PLACES = ("online", "cache", "server")


@dataclass(frozen=True)
class Shape:
    """What the memory model reads from a config."""

    params: int
    embedding: int  # input embedding parameters (no compute)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv: int  # key/value width (heads x head_dim for the kv heads)
    vocab: int

    @property
    def compute_params(self) -> int:
        return self.params - self.embedding


def shape_from_config(config: Any) -> Shape:
    """The shape of a transformers config, its parameters counted on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    text = getattr(config, "text_config", None) or config
    heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    return Shape(
        params=params,
        embedding=model.get_input_embeddings().weight.numel(),
        layers=int(text.num_hidden_layers),
        hidden=int(text.hidden_size),
        intermediate=int(text.intermediate_size),
        heads=heads,
        kv=kv_heads * int(head_dim),
        vocab=int(text.vocab_size),
    )


def model_config(spec: str, **overrides: Any) -> Any:
    """A model spec's transformers config, read without weights (a bundled model's from its
    converted dir or GGUF header), with `overrides` applied (a student cut from a teacher)."""
    from transformers import AutoConfig

    from lmdistill.teachers.bundled import BUNDLED_NAMES, bundled_config

    if spec in BUNDLED_NAMES:
        raw = dict(bundled_config(spec))
        raw = {k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")}
        config = AutoConfig.for_model(str(raw.pop("model_type")), **raw)
    else:
        from lmdistill.models import model_config_file

        config = AutoConfig.from_pretrained(model_config_file(spec).parent)
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    if overrides.get("hidden_size") and getattr(config, "head_dim", None):
        config.head_dim = config.hidden_size // config.num_attention_heads
    return config


# ---------------------------------------------------------------------------------- memory
def activation_bytes(
    s: Shape, tokens: int, row: int, dtype_bytes: int, math_attention: bool
) -> int:
    """Activations kept for the backward of one micro-batch of `tokens` tokens in rows of `row`."""
    per_layer = 7 * s.hidden + 2 * s.kv + 4 * s.intermediate
    if math_attention:
        per_layer += s.heads * row
    return tokens * (s.layers * per_layer + 3 * s.hidden) * dtype_bytes


def loss_chunk_bytes(vocab: int, loss_rows: int) -> int:
    from lmdistill.losses.fused import default_chunk_size

    return 4 * min(default_chunk_size(vocab), max(loss_rows, 1)) * vocab * 4


@dataclass
class Memory:
    """Bytes per GPU of one stage under one strategy."""

    teacher: int = 0
    student: int = 0  # weights
    optimizer: int = 0  # gradients + AdamW moments
    activations: int = 0
    loss_chunks: int = 0

    @property
    def total(self) -> int:
        return self.teacher + self.student + self.optimizer + self.activations + self.loss_chunks


def train_memory(
    student: Shape,
    teacher: Shape | None,
    *,
    strategy: str,
    place: str,
    gpus: int,
    tokens: int,
    row: int,
    compute_bytes: int,
    teacher_bytes: int,
    math_attention: bool = False,
    loss_rows: int | None = None,
) -> Memory:
    """One training micro-batch's peak, per GPU (see the module docstring)."""
    shards = gpus if strategy == "fsdp" else 1
    m = Memory()
    m.student = 4 * student.params // shards
    m.optimizer = 12 * student.params // shards
    m.activations = activation_bytes(student, tokens, row, compute_bytes, math_attention)
    m.loss_chunks = loss_chunk_bytes(student.vocab, tokens if loss_rows is None else loss_rows)
    if teacher is not None and place == "online":
        m.teacher = teacher_bytes * teacher.params + tokens * teacher.hidden * teacher_bytes
    return m


def inference_memory(model: Shape, *, tokens: int, dtype_bytes: int, kv_tokens: int = 0) -> int:
    """A forward without gradients: weights, one layer's working set, a KV cache, the top-k
    chunk of the cache stage's LM head."""
    working = tokens * (2 * model.hidden + model.intermediate) * dtype_bytes * 2
    kv_cache = kv_tokens * 2 * model.layers * model.kv * dtype_bytes
    return model.params * dtype_bytes + working + kv_cache + loss_chunk_bytes(model.vocab, tokens)


# ------------------------------------------------------------------------------------ plan
@dataclass
class PlanSettings:
    gpus: int = 1
    gpu_memory_gib: float = 80.0
    mfu: float = 0.4
    gpu_tflops: float = 989.0  # dense bf16, H100 SXM
    price_input: float | None = None  # USD per million tokens, an API teacher
    price_output: float | None = None
    examples: int | None = None  # when the data cannot be counted (a Hub dataset)
    example_tokens: int | None = None  # tokens per example, instead of ~4 characters per token


@dataclass
class StagePlan:
    name: str
    rows: dict[str, Memory | int] = field(default_factory=dict)  # strategy -> per-GPU bytes
    tokens: int = 0
    flops: float = 0.0
    note: str = ""
    spend_usd: float | None = None


@dataclass
class RecipePlan:
    settings: PlanSettings
    stages: list[StagePlan]
    models: dict[str, Shape]

    def hours(self, stage: StagePlan) -> float:
        s = self.settings
        return stage.flops / (s.gpus * s.gpu_tflops * 1e12 * s.mfu) / 3600

    def to_json(self) -> dict[str, Any]:
        budget = self.settings.gpu_memory_gib * GIB
        out = []
        for st in self.stages:
            rows = {}
            for name, mem in st.rows.items():
                total = mem.total if isinstance(mem, Memory) else mem
                entry = {"total": total, "fits": total <= budget}  # bytes per GPU
                if isinstance(mem, Memory):
                    entry |= {k: getattr(mem, k) for k in mem.__dataclass_fields__}
                rows[name] = entry
            out.append(
                {
                    "stage": st.name,
                    "memory_per_gpu": rows,
                    "tokens": st.tokens,
                    "hours": round(self.hours(st), 3),
                    "spend_usd": st.spend_usd,
                    "note": st.note,
                }
            )
        return {
            "settings": self.settings.__dict__,
            "stages": out,
            "models": {k: v.__dict__ for k, v in self.models.items()},
        }


def count_records(source: str | None, fields: Any = None) -> tuple[int, int]:
    """(records, mean characters of prompt + response) of a data source, read as a stream."""
    from lmdistill.data.records import iter_records

    if source is None or not Path(str(source).split("@")[0]).exists():
        return 0, 0
    n = chars = 0
    for _, record in iter_records(source, fields):
        n += 1
        chars += len(json.dumps(record.get("messages") or record.get("prompt") or ""))
        chars += len(str(record.get("response") or ""))
    return n, chars // max(n, 1)


def plan_recipe(path: str | Path, settings: PlanSettings) -> RecipePlan:
    """The plan of a run recipe (`lmdistill run`) or a training recipe (`lmdistill train`)."""
    from lmdistill.training.config import load_config, read_yaml_mapping

    raw = read_yaml_mapping(Path(path))
    if "objectives" in raw:  # a training recipe
        return _plan(settings, train=load_config(path), teacher_spec=None, run=None)
    from lmdistill.pipelines.run import load_recipe, train_config

    recipe = load_recipe(path, check=False)
    config = train_config(recipe, str(path))
    return _plan(settings, train=config, teacher_spec=recipe.teacher, run=recipe)


def _plan(settings: PlanSettings, *, train, teacher_spec: str | None, run) -> RecipePlan:
    from lmdistill.teachers.registry import is_api_spec
    from lmdistill.training.config import LogitsObjective, logits_source

    if settings.gpus < 1 or settings.gpu_memory_gib <= 0 or not 0 < settings.mfu <= 1:
        raise UserError("--gpus must be >= 1, --gpu-memory > 0 and --mfu in (0, 1]")
    teacher_spec = teacher_spec or (train.teacher.model if train is not None else None)
    api = teacher_spec is not None and is_api_spec(teacher_spec)
    models: dict[str, Shape] = {}
    if teacher_spec and not api:
        models["teacher"] = shape_from_config(model_config(teacher_spec))
    teacher = models.get("teacher")
    stages: list[StagePlan] = []
    gpu_b = 2  # bf16 on a GPU that has it (the loader's and the loop's choice)

    # Data: prompts and answers counted from the files there are.
    prompts = max_tokens = n = 0
    if run is not None and run.generate is not None:
        n, max_tokens = run.generate.n, run.generate.max_tokens
        given = settings.examples is not None and settings.example_tokens is not None
        if run.prompts is not None and run.prompts.path and not given:
            prompts, prompt_chars = count_records(run.prompts.path)
        else:
            prompts, prompt_chars = (run.prompts.limit or 0) if run.prompts else 0, 200
        if run.prompts is not None and run.prompts.limit:
            prompts = min(prompts, run.prompts.limit) if prompts else run.prompts.limit
        prompts = settings.examples or prompts
        prompt_tokens = max(prompt_chars // 4, 1)  # ~4 characters per token (English, BPE)
        if settings.example_tokens is not None:
            prompt_tokens = max(settings.example_tokens - max_tokens, 1)
        gen = StagePlan(
            "generate", note=f"{prompts} prompts x {n} samples, up to {max_tokens} tokens"
        )
        gen.tokens = prompts * n * (prompt_tokens + max_tokens)
        if api:
            gen.note += "; API teacher: no GPU"
            if settings.price_input is not None or settings.price_output is not None:
                gen.spend_usd = round(
                    prompts
                    * n
                    * (
                        prompt_tokens * (settings.price_input or 0)
                        + max_tokens * (settings.price_output or 0)
                    )
                    / 1e6,
                    2,
                )
            else:
                gen.note += " (give --price-input/--price-output for its spend)"
        elif teacher is not None:
            gen.flops = 2 * teacher.compute_params * gen.tokens
            gen.rows["teacher"] = inference_memory(
                teacher, tokens=2048, dtype_bytes=gpu_b, kv_tokens=64 * (prompt_tokens + max_tokens)
            )
            gen.note += "; 64 sequences in flight"
        stages.append(gen)
        examples, example_tokens = prompts * n, prompt_tokens + max_tokens
    else:
        given = settings.examples is not None and settings.example_tokens is not None
        counted = train is not None and not given  # reading a large file takes a while
        examples, chars = count_records(train.data.path) if counted else (0, 0)
        examples = settings.examples or examples
        example_tokens = settings.example_tokens or max(chars // 4, 1)
    if train is None:
        return RecipePlan(settings, stages, models)

    # The student.
    ft = train.student.from_teacher
    if ft is not None:
        layers = ft.layers if isinstance(ft.layers, int) else len(ft.layers)
        config = model_config(
            ft.teacher,
            num_hidden_layers=layers,
            intermediate_size=ft.intermediate_size,
            hidden_size=ft.hidden_size,
        )
    else:
        config = model_config(train.student.model)
    student = models["student"] = shape_from_config(config)
    max_length, tokens = train.data.max_length, train.batch.tokens_per_micro_batch
    example_tokens = min(example_tokens, max_length)
    epochs = train.optim.epochs
    total_tokens = int(epochs * examples * example_tokens)
    if train.optim.steps is not None:
        total_tokens = train.optim.steps * train.batch.micro_batches_per_step * tokens

    if run is not None and run.cache_logits is not None and teacher is not None:
        cache = StagePlan("cache_logits", tokens=examples * example_tokens)
        cache.flops = 2 * teacher.compute_params * cache.tokens
        cache.rows["teacher"] = inference_memory(
            teacher, tokens=run.cache_logits.tokens_per_batch, dtype_bytes=gpu_b
        )
        cache.note = f"top-{run.cache_logits.top_k}: {cache.tokens * run.cache_logits.top_k * 4 / GIB:.1f} GiB of shards"
        stages.append(cache)

    online = any(
        isinstance(o, LogitsObjective) and logits_source(o, train.teacher) == "online"
        for o in train.objectives
    ) or any(o.kind in ("hidden", "uld") for o in train.objectives)
    st = StagePlan("train", tokens=total_tokens)
    st.flops = 6 * student.compute_params * total_tokens
    if online and teacher is not None:
        st.flops += 2 * teacher.compute_params * total_tokens
    for strategy in STRATEGIES:
        for place in TEACHER_PLACES if teacher is not None else ("online",):
            name = strategy if teacher is None else f"{strategy}, teacher {place}"
            st.rows[name] = train_memory(
                student,
                teacher,
                strategy=strategy,
                place=place,
                gpus=settings.gpus,
                tokens=tokens,
                row=max_length,
                compute_bytes=gpu_b,
                teacher_bytes=gpu_b,
            )
    st.note = (
        f"{examples} examples x ~{example_tokens} tokens x {epochs:g} epochs; micro-batch "
        f"{tokens} tokens; teacher {'online (as the recipe says)' if online else 'not needed online'}"
    )
    stages.append(st)
    return RecipePlan(settings, stages, models)


def format_plan(plan: RecipePlan) -> str:
    s = plan.settings
    budget = s.gpu_memory_gib * GIB
    lines = [
        f"{s.gpus} GPU(s) x {s.gpu_memory_gib:g} GiB, {s.gpu_tflops:g} TFLOP/s at MFU {s.mfu:g}; "
        "bf16 compute, fp32 master weights and AdamW"
    ]
    for role, m in plan.models.items():
        lines.append(
            f"{role}: {m.params / 1e9:.3f}B parameters ({m.layers} layers, hidden {m.hidden}, vocab {m.vocab})"
        )
    for st in plan.stages:
        lines.append("")
        head = f"[{st.name}] {st.tokens:,} tokens, ~{plan.hours(st):.2f} h"
        if st.spend_usd is not None:
            head += f", API spend ~${st.spend_usd:,.2f}"
        lines.append(head + (f"  ({st.note})" if st.note else ""))
        if not st.rows:
            continue
        lines.append(
            f"  {'per GPU (GiB)':<26}{'teacher':>9}{'student':>9}{'optim':>9}{'activ.':>9}{'loss':>9}{'total':>9}  fits"
        )
        for name, mem in st.rows.items():
            if isinstance(mem, Memory):
                cols = [mem.teacher, mem.student, mem.optimizer, mem.activations, mem.loss_chunks]
                total = mem.total
            else:
                cols, total = [mem, 0, 0, 0, 0], mem
            cells = "".join(f"{c / GIB:>9.2f}" for c in cols)
            lines.append(
                f"  {name:<26}{cells}{total / GIB:>9.2f}  {'yes' if total <= budget else 'NO'}"
            )
    return "\n".join(lines)
