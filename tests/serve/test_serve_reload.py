"""POST /reload_weights: off unless allowed, keyed like /v1, and a file that does not fit the
served model is a 400 that leaves the served weights as they were."""

from __future__ import annotations

from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file, save_model

from lmdistill.serve import create_app, running_server
from lmdistill.teachers.local import HFTeacher

KEY = "reload-key-0123456789"


def root(url: str) -> str:
    return url.removesuffix("/v1")


def snapshot(teacher: HFTeacher) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in teacher.model.state_dict().items()}


def test_reload_is_off_by_default(tiny_model_dir: Path, tmp_path: Path) -> None:
    teacher = HFTeacher(tiny_model_dir, name="tiny")
    save_model(teacher.model, str(tmp_path / "w.safetensors"))
    with running_server(create_app(teacher)) as url:
        r = httpx.post(
            f"{root(url)}/reload_weights", json={"path": str(tmp_path / "w.safetensors")}
        )
    assert r.status_code == 403
    assert "--allow-weight-reload" in r.json()["error"]["message"]


def test_reload_replaces_the_weights_and_needs_the_key(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    teacher = HFTeacher(tiny_model_dir, name="tiny")
    before = snapshot(teacher)
    shifted = {k: v + 0.5 for k, v in before.items() if k != "lm_head.weight"}  # tied to embed
    save_file(shifted, str(tmp_path / "shifted.safetensors"))
    body = {"path": str(tmp_path / "shifted.safetensors")}
    app = create_app(teacher, api_key=KEY, allow_weight_reload=True)
    with running_server(app) as url:
        unkeyed = httpx.post(f"{root(url)}/reload_weights", json=body)
        assert unkeyed.status_code == 401
        assert all(torch.equal(v, before[k]) for k, v in teacher.model.state_dict().items())
        keyed = httpx.post(
            f"{root(url)}/reload_weights", json=body, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert keyed.status_code == 200, keyed.text
        assert keyed.json() == {"status": "ok", "tensors": len(shifted)}
        # The server still answers, from the new weights.
        done = httpx.post(
            f"{url}/completions",
            json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 2},
            headers={"Authorization": f"Bearer {KEY}"},
        )
        assert done.status_code == 200
    for name, tensor in teacher.model.state_dict().items():
        torch.testing.assert_close(tensor, before[name] + 0.5, msg=name)


def test_a_file_that_does_not_fit_is_a_400_and_changes_nothing(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    teacher = HFTeacher(tiny_model_dir, name="tiny")
    before = snapshot(teacher)
    first = next(iter(before))
    wrong_shape = {**before, first: torch.zeros(3, 3)}
    wrong_shape.pop("lm_head.weight", None)
    save_file(wrong_shape, str(tmp_path / "shape.safetensors"))
    partial = {first: before[first] + 1}  # every other parameter missing
    save_file(partial, str(tmp_path / "partial.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    cases = {
        "shape.safetensors": "has shape (3, 3)",
        "partial.safetensors": "no tensor for",
        "garbage.safetensors": "cannot read",
        "missing.safetensors": "cannot read",
    }
    with running_server(create_app(teacher, allow_weight_reload=True)) as url:
        for name, message in cases.items():
            r = httpx.post(f"{root(url)}/reload_weights", json={"path": str(tmp_path / name)})
            assert r.status_code == 400, (name, r.text)
            assert message in r.json()["error"]["message"], (name, r.text)
    assert all(torch.equal(v, before[k]) for k, v in teacher.model.state_dict().items())
