"""Importance-based pruning: layers chosen by iterative removal on calibration KL, MLP neurons by
their activations, and the student built from them is exactly those pieces of the teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmdistill.training import pruning
from lmdistill.training.students import STUDENT_META, load_model_dir, student_from_teacher

TEXTS = [
    "the cat sat on the mat and looked at the door",
    "a dog ran to the park where the children played",
    "rain fell on the quiet town all night long",
    "she wrote a short note to thank her friend",
]


@pytest.fixture(scope="module")
def teacher(teacher_dir: Path):
    model, tokenizer = load_model_dir(teacher_dir)
    return model.eval(), tokenizer


def test_only_layers_runs_a_subset_and_restores_the_model(teacher):
    model, tokenizer = teacher
    ids, mask = pruning.calibration_batch(tokenizer, TEXTS, 32)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with pruning.only_layers(model, [0, 3]):
            assert model.config.num_hidden_layers == 2
            pruned = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        after = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert model.config.num_hidden_layers == 4
    torch.testing.assert_close(after, before)
    assert not torch.allclose(pruned, before)


def test_iterative_removal_drops_the_least_harmful_layer_each_time(teacher):
    model, tokenizer = teacher
    ids, mask = pruning.calibration_batch(tokenizer, TEXTS, 32)
    steps = []
    kept, kl = pruning.prune_layers_by_kl(
        model, ids, mask, 2, on_step=lambda k, v: steps.append((k, v))
    )
    assert len(kept) == 2 and kept == sorted(kept) and len(steps) == 2
    # First removal: the brute-force best single removal.
    singles = {
        j: pruning.layers_kl(model, ids, mask, [i for i in range(4) if i != j]) for j in range(4)
    }
    dropped = ({0, 1, 2, 3} - set(steps[0][0])).pop()
    assert singles[dropped] == pytest.approx(min(singles.values()))
    # The reported KL is the kept layers' KL, and keeping every layer costs nothing.
    assert kl == pytest.approx(pruning.layers_kl(model, ids, mask, kept), rel=1e-5)
    assert pruning.prune_layers_by_kl(model, ids, mask, 4) == ([0, 1, 2, 3], 0.0)


def test_an_importance_student_is_the_chosen_layers_and_records_its_calibration_kl(
    tmp_path: Path, teacher_dir: Path, teacher
):
    model, tokenizer = teacher
    info = student_from_teacher(
        teacher_dir, layers=2, out_dir=tmp_path / "s", selection="importance", calibration=TEXTS
    )
    meta = json.loads((tmp_path / "s" / STUDENT_META).read_text())
    assert meta["selection"] == "importance" and meta["layers"] == info.layers
    ids, mask = pruning.calibration_batch(tokenizer, TEXTS, 96)
    expected = pruning.layers_kl(model, ids, mask, info.layers)
    assert info.calibration_kl == pytest.approx(expected, rel=1e-4)
    student, _ = load_model_dir(tmp_path / "s")
    assert pruning.student_kl(model, student, ids, mask) == pytest.approx(expected, rel=1e-4)
    # A spread student of the same size, judged on the same text, records its own KL.
    spread = student_from_teacher(teacher_dir, layers=2, out_dir=tmp_path / "p", calibration=TEXTS)
    assert spread.selection == "spread" and spread.layers == [0, 3]
    assert spread.calibration_kl == pytest.approx(
        pruning.layers_kl(model, ids, mask, [0, 3]), rel=1e-4
    )


def test_mlp_neurons_are_kept_by_their_activations_on_calibration_text(
    tmp_path: Path, teacher_dir: Path, teacher
):
    """A neuron whose output weights are shrunk 1000x has the smallest weight-norm score, so the
    weight rule drops it; its activation is untouched, so the activation rule keeps it (and drops
    the least active neuron instead)."""
    _, tokenizer = teacher
    model = load_model_dir(teacher_dir)[0]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, 5].mul_(1e-3)
    ids, mask = pruning.calibration_batch(tokenizer, TEXTS, 96)
    activity = pruning.mlp_activation_importance(model, ids, mask)[0]
    assert int(activity.argmin()) != 5
    size = model.config.intermediate_size - 1
    gate_5 = model.model.layers[0].mlp.gate_proj.weight[5]

    def keeps_neuron_5(out: Path) -> bool:
        rows = load_model_dir(out)[0].model.layers[0].mlp.gate_proj.weight
        return any(bool(torch.equal(row, gate_5)) for row in rows)

    common = dict(tokenizer=tokenizer, layers=[0, 1], intermediate_size=size)
    student_from_teacher(model, out_dir=tmp_path / "a", calibration=TEXTS, **common)
    student_from_teacher(model, out_dir=tmp_path / "w", **common)
    assert keeps_neuron_5(tmp_path / "a")
    assert not keeps_neuron_5(tmp_path / "w")


def test_importance_selection_without_calibration_text_is_refused(tmp_path, teacher_dir):
    from lmdistill.errors import UserError

    with pytest.raises(UserError, match="calibration"):
        student_from_teacher(teacher_dir, layers=2, out_dir=tmp_path / "x", selection="importance")


def test_a_recipe_builds_its_student_by_importance_on_its_own_training_data(
    tmp_path: Path, teacher_dir: Path, sft_data: Path, teacher
):
    from conftest import recipe

    from lmdistill.data.records import field_map
    from lmdistill.data.sft import load_examples
    from lmdistill.training.config import validate
    from lmdistill.training.loop import Trainer

    raw = recipe(tmp_path / "run", teacher_dir, sft_data)
    raw["student"] = {
        "from_teacher": {
            "teacher": str(teacher_dir),
            "layers": 2,
            "selection": "importance",
            "calibration": 6,
            "calibration_tokens": 32,
        }
    }
    trainer = Trainer(validate(raw, "importance"))
    meta = json.loads((tmp_path / "run" / "student-init" / STUDENT_META).read_text())
    # The same choice as ranking on the first 6 conversations of the data, 32 tokens each.
    _, tokenizer = teacher
    examples = load_examples(sft_data, tokenizer, max_length=64, fields=field_map(None)).examples
    texts = [tokenizer.decode(examples[i].input_ids) for i in range(6)]
    expected = student_from_teacher(
        teacher_dir,
        layers=2,
        out_dir=tmp_path / "direct",
        selection="importance",
        calibration=texts,
        calibration_tokens=32,
    )
    assert meta["selection"] == "importance" and meta["layers"] == expected.layers
    assert len(trainer.accelerator.unwrap_model(trainer.module).student.model.layers) == 2
