"""On-policy samples through a real OpenAI-compatible server (`on_policy.server`, issue #12): the
student is served by `lmdistill serve`'s app over HTTP, the trainer pushes its weights before
each on-policy step, and the step trains on the token ids the server sampled."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import recipe
from test_on_policy import sequences

from lmdistill.data.sft import IGNORE_INDEX
from lmdistill.errors import UserError
from lmdistill.serve import create_app, running_server
from lmdistill.teachers.local import HFTeacher
from lmdistill.training.config import PolicyServer, validate
from lmdistill.training.evaluate import evaluate
from lmdistill.training.loop import Trainer
from lmdistill.training.on_policy import prompt_ids
from lmdistill.training.policy_server import PolicyServerClient
from lmdistill.training.students import load_model_dir

KEY = "policy-key-0123456789"


def server_config(tmp_path, name, student_dir, teacher_dir, data, server, steps=3, **on_policy):
    raw = recipe(
        tmp_path / name,
        student_dir,
        data,
        teacher={"model": str(teacher_dir)},
        objectives=[{"kind": "logits", "alpha": 0.5, "temperature": 1.0}],
        optim={"lr": 1e-2, "steps": steps, "warmup_steps": 1},
    )
    raw["on_policy"] = {"lambda": 1.0, "max_new_tokens": 12, "server": server, **on_policy}
    return validate(raw, name)


def test_a_run_samples_through_the_server_and_keeps_its_weights_current(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path, monkeypatch
):
    served = HFTeacher(student_dir, name="student")
    pushed: list[dict[str, torch.Tensor]] = []
    original_push = PolicyServerClient.push

    def record_push(self, model):
        pushed.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return original_push(self, model)

    monkeypatch.setattr(PolicyServerClient, "push", record_push)
    seen = []
    original_step = Trainer.train_step

    def keep(self, batches):
        seen.append(batches)
        return original_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", keep)
    monkeypatch.setenv("POLICY_KEY", KEY)
    app = create_app(served, api_key=KEY, allow_weight_reload=True)
    with running_server(app) as url:
        server = {"url": url, "api_key_env": "POLICY_KEY", "sync_every": 2}
        cfg = server_config(tmp_path, "served", student_dir, teacher_dir, sft_data, server, steps=4)
        trainer = Trainer(cfg)
        result = trainer.run()

    # sync_every 2 over 4 on-policy steps: pushed before steps 1 and 3 (1-based); the first push
    # is the untrained student, the second has moved; the server ends with the second.
    assert len(pushed) == 2
    initial = load_model_dir(student_dir)[0].state_dict()
    assert all(torch.equal(pushed[0][k], initial[k]) for k in initial)
    assert not all(torch.equal(pushed[1][k], initial[k]) for k in initial)
    for name, tensor in served.model.state_dict().items():
        torch.testing.assert_close(tensor, pushed[1][name], rtol=0, atol=0, msg=name)

    prompts = {tuple(prompt_ids(e)) for e in trainer.train_examples}
    eos = trainer.tokenizer.eos_token_id
    for batches in seen:
        assert batches and all(b.sampled for b in batches)
        for ids, targets in sequences(batches[0]):
            cut = max(n for n in range(len(ids)) if tuple(ids[:n]) in prompts)
            sampled = ids[cut:]
            assert 0 < len(sampled) <= 12
            assert [y for y in targets if y != IGNORE_INDEX] == sampled
            assert sampled[-1] == eos or len(sampled) == 12
            assert eos not in sampled[:-1]
    assert all(r["on_policy"] == 1 and math.isfinite(r["loss"]) for r in result.history)
    # The training signal is the in-process one: the KL to the teacher on the first step's
    # (server-sampled) tokens falls.
    trained = load_model_dir(result.final_dir)[0]
    before = evaluate(load_model_dir(student_dir)[0], seen[0], trainer.teacher)["kl"]
    assert evaluate(trained, seen[0], trainer.teacher)["kl"] < before


def test_the_server_samples_from_the_pushed_weights(tmp_path: Path, teacher_dir: Path):
    """A server started on random weights of the teacher's shape, once the teacher's weights are
    pushed, samples (near-greedy) exactly the teacher's in-process greedy tokens."""
    from tiny import save_tiny_model_dir

    other = save_tiny_model_dir(tmp_path / "other", layers=4, hidden=48, heads=4, seed=5)
    served = HFTeacher(other, name="policy")
    teacher = load_model_dir(teacher_dir)[0]
    eos = served.tokenizer.eos_token_id
    prompt = served.encode_chat([{"role": "user", "content": "What is 2 + 3?"}])
    with torch.no_grad():
        greedy = teacher.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False
        )[0, len(prompt) :].tolist()

    def sample(client: PolicyServerClient) -> list[int]:
        (ids,) = client.sample(
            [prompt], max_new_tokens=10, temperature=1e-4, top_p=1.0, seed=1, stop_ids={eos}
        )
        return ids

    with running_server(create_app(served, allow_weight_reload=True)) as url:
        client = PolicyServerClient(PolicyServer(url=url), tmp_path / "run")
        before = sample(client)
        client.push(teacher)
        after = sample(client)
    assert after == greedy[: len(after)] and (len(after) == 10 or after[-1] == eos)
    assert before != after


def test_a_server_that_refuses_weights_is_a_clear_error(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path
):
    app = create_app(HFTeacher(student_dir, name="student"))  # no --allow-weight-reload
    with running_server(app) as url:
        cfg = server_config(tmp_path, "refused", student_dir, teacher_dir, sft_data, {"url": url})
        with pytest.raises(UserError, match="--allow-weight-reload"):
            Trainer(cfg).run()


def test_an_unset_key_variable_is_a_clear_error(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path, monkeypatch
):
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    server = {"url": "http://127.0.0.1:9/v1", "api_key_env": "NO_SUCH_KEY_VAR"}
    cfg = server_config(tmp_path, "nokey", student_dir, teacher_dir, sft_data, server)
    with pytest.raises(UserError, match=r"\$NO_SUCH_KEY_VAR is not set"):
        Trainer(cfg)
