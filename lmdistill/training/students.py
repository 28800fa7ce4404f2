"""Students: any Hugging Face causal LM dir, or one built from the teacher's own weights.

`student_from_teacher` keeps a subset of the teacher's decoder layers, with the embeddings, final
norm and LM head, copied unchanged: initialising a shallower student from every other teacher
layer is DistilBERT's recipe (Sanh et al. 2019, sec. 3), and depth pruning a trained LLM this way
and then distilling recovers most of its quality (Minitron, Muralidharan et al. 2024, "Compact
Language Models via Pruning and Knowledge Distillation"). It can also narrow the MLP and the hidden
size by keeping the most important neurons / channels. Minitron ranks them by activations on
calibration data; without data we rank by weight magnitude (rules below), which is a proxy that
keeps the init sensible and lets distillation do the rest.

The output is an ordinary HF model dir (safetensors weights, config, tokenizer with its chat
template, generation config) plus `lmdistill_student.json`, which records the teacher layers each
student layer came from (the hidden-state objective maps layers by it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmdistill.errors import UserError
from lmdistill.store.atomic import atomic_dir, crash_point
from lmdistill.training import pruning

STUDENT_META = "lmdistill_student.json"
# Architectures whose parameter names the narrowing rules below know (Llama-style blocks: q/k/v/o
# attention projections, gate/up/down MLP, RMSNorm before attention and MLP, final norm).
NARROWABLE = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class StudentInfo:
    """What `student_from_teacher` built."""

    out_dir: str
    teacher: str
    layers: list[int]  # teacher layer of each student layer
    hidden_size: int
    intermediate_size: int
    parameters: int
    non_embedding_parameters: int
    teacher_non_embedding_parameters: int
    channels: list[int] | None = field(
        default=None, repr=False
    )  # kept hidden channels, if narrowed
    selection: str = "spread"  # how the layers were chosen: "spread", "importance" or "given"
    # KL(teacher || student) on the calibration text, nats/token, when calibration text was given.
    calibration_kl: float | None = None


def spread_layers(num_layers: int, count: int) -> list[int]:
    """`count` layer indices out of `num_layers`: the first, the last, and evenly between
    (round(i * (L - 1) / (count - 1))). One layer means the last one."""
    if not 1 <= count <= num_layers:
        raise UserError(
            f"a student from a {num_layers}-layer teacher needs 1..{num_layers} layers, got {count}"
        )
    if count == 1:
        return [num_layers - 1]
    return [round(i * (num_layers - 1) / (count - 1)) for i in range(count)]


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters outside the input embedding and LM head (each shared tensor counted once): the
    count that says how much compute per token a model spends, the usual size measure for LMs."""
    seen: set[int] = set()
    embedding = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        embedding.add(id(head.weight))
    total = 0
    for p in model.parameters():
        if id(p) in seen or id(p) in embedding:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def load_model_dir(path: str | Path, *, dtype: torch.dtype | None = torch.float32):
    """(model, tokenizer) from an HF causal LM dir, with a clear error when it is not one."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model dir (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmdistill.teachers.local import LOAD_ERRORS, unloadable

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return model, AutoTokenizer.from_pretrained(path)
    except LOAD_ERRORS as exc:
        raise unloadable(path, exc) from None


def resolve_model_dir(spec: str | Path) -> Path:
    """A bundled teacher name (converted once into the cache), a model dir or a Hub name
    (ORG/NAME[@REVISION]), as a local dir: see `lmdistill.models`."""
    from lmdistill.models import resolve_model_dir as resolve

    return resolve(spec)


def decoder_layers_name(model: torch.nn.Module) -> str:
    """Qualified name of the decoder's ModuleList of layers, e.g. 'model.layers'."""
    layers = model.get_decoder().layers
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise UserError(f"cannot find the decoder layers of {type(model).__name__}")


def student_from_teacher(
    teacher: str | Path | torch.nn.Module,
    *,
    layers: list[int] | int,
    out_dir: str | Path,
    intermediate_size: int | None = None,
    hidden_size: int | None = None,
    tokenizer: Any = None,
    selection: str = "spread",
    calibration: Sequence[str] | None = None,
    calibration_tokens: int = 96,
) -> StudentInfo:
    """Build a student from `teacher` (bundled name, model dir, or a loaded model with
    `tokenizer=`) and save it as an HF model dir in `out_dir`.

    layers: teacher layer indices to keep (in order), or a count spread by `spread_layers`.
    intermediate_size: keep this many MLP neurons per layer, those with the largest
        ||W_gate[n]|| * ||W_up[n]|| * ||W_down[:, n]|| (the size of a neuron's contribution to
        the residual stream for a unit input).
    hidden_size: keep this many residual-stream channels, those with the largest norm over the
        token embeddings (||E[:, c]||): the channels the embeddings write to most. Attention head
        sizes stay the teacher's (config.head_dim is set explicitly).
    selection: with a layer count, "spread" (evenly, `spread_layers`) or "importance" (iterative
        removal by calibration KL, `pruning.prune_layers_by_kl`; needs `calibration`).
    calibration: texts (e.g. rendered teacher conversations) to rank by. With them, MLP neurons
        are ranked by their mean activation on these texts (Minitron) rather than by weight
        norms, and the student's calibration KL to the teacher is recorded.
    calibration_tokens: each calibration text is cut to this many tokens.
    """
    if selection not in ("spread", "importance"):
        raise UserError(
            f"student layer selection must be 'spread' or 'importance', not {selection!r}"
        )
    if selection == "importance" and not calibration:
        raise UserError("importance-based layer selection needs calibration text")
    if isinstance(teacher, torch.nn.Module):
        if tokenizer is None:
            raise TypeError("student_from_teacher(model) needs tokenizer=")
        model, name = teacher, str(getattr(teacher, "name_or_path", "") or "model")
    else:
        model_dir = resolve_model_dir(teacher)
        model, loaded_tokenizer = load_model_dir(model_dir, dtype=None)
        tokenizer = tokenizer or loaded_tokenizer
        name = str(teacher)
    config = model.config
    batch = None
    if calibration:
        batch = pruning.calibration_batch(tokenizer, calibration, calibration_tokens)
    if selection == "importance" and isinstance(layers, int):
        chosen_layers(config.num_hidden_layers, layers)  # the count's range check
        chosen, _ = pruning.prune_layers_by_kl(model, *batch, layers)
    else:
        chosen = chosen_layers(config.num_hidden_layers, layers)
        selection = "spread" if isinstance(layers, int) else "given"
    _check_width(config, "intermediate_size", intermediate_size)
    _check_width(config, "hidden_size", hidden_size)

    student_config = _student_config(config, chosen, intermediate_size, hidden_size)
    activations = None
    if batch is not None and intermediate_size is not None:
        by_layer = pruning.mlp_activation_importance(model, *batch)
        activations = [by_layer[j] for j in chosen]
    state = _select_layers(model.state_dict(), decoder_layers_name(model), chosen)
    channels = None
    if intermediate_size is not None and intermediate_size != config.intermediate_size:
        state = _narrow_mlp(state, intermediate_size, decoder_layers_name(model), activations)
    if hidden_size is not None and hidden_size != config.hidden_size:
        channels = _important_channels(state, model, hidden_size)
        state = _narrow_hidden(state, channels, model)

    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_config(student_config, dtype=model.dtype)
    missing, unexpected = student.load_state_dict(state, strict=False)
    # A tied LM head is not in the state dict twice; anything else missing is a bug here.
    missing = [
        k for k in missing if not (k.endswith("lm_head.weight") and config.tie_word_embeddings)
    ]
    if missing or unexpected:
        raise RuntimeError(
            f"student weights do not match its config: missing {missing}, unexpected {unexpected}"
        )
    student.tie_weights()
    student.generation_config = model.generation_config
    calibration_kl = None
    if batch is not None:
        calibration_kl = pruning.student_kl(model, student, *batch)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = StudentInfo(
        out_dir=str(out),
        teacher=name,
        layers=chosen,
        hidden_size=student_config.hidden_size,
        intermediate_size=student_config.intermediate_size,
        parameters=sum(p.numel() for p in student.parameters()),
        non_embedding_parameters=non_embedding_parameters(student),
        teacher_non_embedding_parameters=non_embedding_parameters(model),
        channels=channels,
        selection=selection,
        calibration_kl=calibration_kl,
    )
    (out / STUDENT_META).write_text(json.dumps(asdict(info), indent=2) + "\n")
    return info


def chosen_layers(num_layers: int, layers: list[int] | int) -> list[int]:
    """The teacher layers a student built from a `num_layers`-layer teacher keeps: `layers` as
    given, or a count spread by `spread_layers`. A UserError when they do not fit the teacher."""
    chosen = spread_layers(num_layers, layers) if isinstance(layers, int) else list(layers)
    if not chosen or any(not 0 <= j < num_layers for j in chosen):
        raise UserError(
            f"student layers must be teacher layer indices in [0, {num_layers}), got {chosen}"
        )
    if len(set(chosen)) != len(chosen):
        # The same teacher layer twice would share nothing after saving, but it is almost
        # certainly a typo in a layer list.
        raise UserError(f"student layers repeat a teacher layer: {chosen}")
    return chosen


def _check_width(config: Any, what: str, new: int | None) -> None:
    """A UserError when the teacher `config` cannot be narrowed to `new` in `what`
    (intermediate_size or hidden_size); None or the teacher's own size keep it as it is."""
    old = getattr(config, what)
    if new is None or new == old:
        return
    _check_narrowable(config, what, new, old)
    if what == "hidden_size" and new % config.num_attention_heads:
        # transformers' config validation insists on it, although head_dim is kept explicitly.
        raise UserError(
            f"hidden_size must be a multiple of the {config.num_attention_heads} attention "
            f"heads, got {new}"
        )


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide whether a student fits its teacher, read from a config alone (no
    weights): attribute names as in a transformers config, so the checks above take either."""

    model_type: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int


def model_shape(spec: str | Path) -> ModelShape:
    """The shape of a bundled model (from its converted dir, else its GGUF's header), of a model
    dir or of a Hub model (its config.json alone; a multimodal config's text_config)."""
    from lmdistill.teachers.bundled import BUNDLED_NAMES, bundled_config

    if str(spec) in BUNDLED_NAMES:
        raw = bundled_config(str(spec))
    else:
        from lmdistill.models import model_config_file

        raw = json.loads(model_config_file(spec).read_text())
        raw = {**raw, **(raw.get("text_config") or {})}
    try:
        return ModelShape(
            model_type=str(raw["model_type"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            vocab_size=int(raw["vocab_size"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"model '{spec}': its config lacks {exc} (not a decoder LM?)") from None


def student_problems(
    teacher: ModelShape,
    *,
    layers: list[int] | int,
    intermediate_size: int | None = None,
    hidden_size: int | None = None,
) -> dict[str, str]:
    """What `student_from_teacher` would refuse, by its argument's name, found from the teacher's
    shape alone: the same checks, run before any weight is loaded."""
    checks = {
        "layers": lambda: chosen_layers(teacher.num_hidden_layers, layers),
        "intermediate_size": lambda: _check_width(teacher, "intermediate_size", intermediate_size),
        "hidden_size": lambda: _check_width(teacher, "hidden_size", hidden_size),
    }
    problems = {}
    for name, check in checks.items():
        try:
            check()
        except UserError as exc:
            problems[name] = str(exc)
    return problems


def source_layers(student_dir: str | Path) -> list[int] | None:
    """The teacher layer each student layer was copied from, when the student was built by
    `student_from_teacher`; else None."""
    meta = Path(student_dir) / STUDENT_META
    if not meta.is_file():
        return None
    return list(json.loads(meta.read_text())["layers"])


def _student_config(
    config, chosen: list[int], intermediate_size: int | None, hidden_size: int | None
):
    student = config.__class__.from_dict(config.to_dict())
    student.num_hidden_layers = len(chosen)
    # Per-layer settings (sliding vs full attention in Qwen2/Gemma, ...) follow their layers.
    for key in ("layer_types", "sliding_window_pattern_list"):
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == config.num_hidden_layers:
            setattr(student, key, [value[j] for j in chosen])
    if intermediate_size is not None:
        student.intermediate_size = intermediate_size
    if hidden_size is not None:
        # Heads keep their size: head_dim is otherwise derived as hidden_size / num_heads.
        student.head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        student.hidden_size = hidden_size
    return student


def _select_layers(state: dict[str, Tensor], prefix: str, chosen: list[int]) -> dict[str, Tensor]:
    """Teacher weights renamed for the student: layer chosen[i] becomes layer i."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    source = {j: i for i, j in enumerate(chosen)}  # distinct: checked by chosen_layers
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        match = pattern.match(key)
        if match is None:
            out[key] = value.clone()
        elif int(match.group(1)) in source:
            out[f"{prefix}.{source[int(match.group(1))]}.{match.group(2)}"] = value.clone()
    return out


def _check_narrowable(config, what: str, new: int, old: int) -> None:
    if config.model_type not in NARROWABLE:
        raise UserError(
            f"narrowing {what} knows the parameter layout of {', '.join(NARROWABLE)} models, not "
            f"'{config.model_type}'; keep the teacher's {what} (only choose layers)"
        )
    if not 0 < new < old:
        raise UserError(f"{what} must be in [1, {old}) to narrow the teacher's {old}, got {new}")


def _top(importance: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries, in ascending index order (keeps the original layout)."""
    return importance.topk(k).indices.sort().values


def _narrow_mlp(
    state: dict[str, Tensor], size: int, prefix: str, activations: list[Tensor] | None = None
) -> dict[str, Tensor]:
    """Keep `size` MLP neurons per layer: by `activations[i]` (student layer i's neurons' mean
    activation on calibration text) when given, else by weight norms."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.mlp\.down_proj\.weight$")
    for key in [k for k in state if k.endswith("mlp.down_proj.weight")]:
        stem = key.removesuffix("down_proj.weight")
        gate, up, down = (
            state[stem + "gate_proj.weight"],
            state[stem + "up_proj.weight"],
            state[key],
        )
        match = pattern.match(key)
        if activations is not None and match is not None:
            importance = activations[int(match.group(1))]
        else:
            importance = (
                gate.float().norm(dim=1) * up.float().norm(dim=1) * down.float().norm(dim=0)
            )
        keep = _top(importance, size)
        state[stem + "gate_proj.weight"] = gate[keep].clone()
        state[stem + "up_proj.weight"] = up[keep].clone()
        state[key] = down[:, keep].clone()
    return state


def _important_channels(state: dict[str, Tensor], model, size: int) -> list[int]:
    embed_key = _param_key(model, model.get_input_embeddings().weight)
    return _top(state[embed_key].float().norm(dim=0), size).tolist()


def _param_key(model, param: Tensor) -> str:
    for key, value in model.state_dict(keep_vars=True).items():
        if value is param:
            return key
    raise RuntimeError("parameter not found in the model's state dict")


# Which dimension of each Llama-style weight is the residual stream (hidden size).
_HIDDEN_DIM = (
    (re.compile(r"(embed_tokens|lm_head)\.weight$"), 1),
    (re.compile(r"(input_layernorm|post_attention_layernorm)\.weight$|^model\.norm\.weight$"), 0),
    (re.compile(r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$"), 1),
    (re.compile(r"(o_proj|down_proj)\.(weight|bias)$"), 0),
)


def _narrow_hidden(state: dict[str, Tensor], channels: list[int], model) -> dict[str, Tensor]:
    keep = torch.tensor(channels)
    hidden = model.config.hidden_size
    for key, value in state.items():
        for pattern, dim in _HIDDEN_DIM:
            if pattern.search(key):
                if value.shape[dim] != hidden:
                    raise RuntimeError(
                        f"{key}: expected dim {dim} of size {hidden}, got {tuple(value.shape)}"
                    )
                state[key] = value.index_select(dim, keep).clone()
                break
    return state


@dataclass(frozen=True)
class LoraSettings:
    """Low-rank adapters (Hu et al. 2021, "LoRA") on the student's linear layers."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = "all-linear"


def apply_lora(model, settings: LoraSettings):
    """`model` wrapped with trainable LoRA adapters (PEFT); every other weight is frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("LoRA students need PEFT: pip install 'lmdistill[lora]'") from None
    targets = (
        settings.target_modules
        if isinstance(settings.target_modules, str)
        else list(settings.target_modules)
    )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_student(
    model, tokenizer, out_dir: str | Path, *, state_dict: dict[str, Tensor] | None = None
) -> Path:
    """Save a trained student as a plain HF model dir; LoRA adapters are merged into the weights
    so the dir loads with AutoModelForCausalLM.from_pretrained and no PEFT. `state_dict`: the
    full weights when `model` holds shards of them (FSDP); ignored for a LoRA model.

    The dir (weights, config, generation config, tokenizer, chat template) appears whole or not at
    all, replacing an old one (`lmdistill.store.atomic_dir`): later stages and reruns trust it."""
    if hasattr(model, "merge_and_unload"):
        model, state_dict = model.merge_and_unload(), None
    # Training turns the KV cache off; the saved model is for generation, so it is on again (and
    # the dir's config is the untrained student's: the cost table times one model per config).
    training_use_cache = model.config.use_cache
    model.config.use_cache = True
    try:
        with atomic_dir(out_dir) as tmp:
            crash_point("save-student:before-weights")  # the kill -9 tests' moments (issue 19)
            model.save_pretrained(tmp, state_dict=state_dict)
            crash_point("save-student:before-tokenizer")
            tokenizer.save_pretrained(tmp)
    finally:
        model.config.use_cache = training_use_cache
    return Path(out_dir)
