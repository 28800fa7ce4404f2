"""On-policy distillation (GKD) in the loop: lambda = 0 is the off-policy run, lambda = 1 trains on
the student's own samples scored by the teacher, and a resumed run samples the same tokens."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from conftest import recipe

from lmdistill.data.sft import IGNORE_INDEX
from lmdistill.errors import RecipeError
from lmdistill.store.atomic import read_jsonl_tolerant
from lmdistill.training.config import validate
from lmdistill.training.evaluate import evaluate
from lmdistill.training.loop import Trainer, train
from lmdistill.training.on_policy import prompt_ids, sampled_example
from lmdistill.training.students import load_model_dir


def on_policy_config(tmp_path, name, student_dir, teacher_dir, data, on_policy=None, **sections):
    raw = recipe(
        tmp_path / name,
        student_dir,
        data,
        teacher={"model": str(teacher_dir)},
        objectives=[{"kind": "logits", "alpha": 0.5, "temperature": 1.0}],
        **sections,
    )
    if on_policy is not None:
        raw["on_policy"] = on_policy
    return validate(raw, name)


def sequences(batch):
    """(input ids, targets) of each packed example of a batch."""
    out = []
    for ids, pos, tgt, real in zip(
        batch.input_ids, batch.position_ids, batch.targets, batch.real, strict=True
    ):
        starts = [int(t) for t in torch.nonzero((pos == 0) & real).flatten()]
        ends = [*starts[1:], int(real.sum())]
        out += [(ids[a:b].tolist(), tgt[a:b].tolist()) for a, b in zip(starts, ends, strict=True)]
    return out


def test_lambda_zero_reproduces_the_off_policy_run_bitwise(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path
):
    optim = {"lr": 1e-2, "steps": 3, "warmup_steps": 1}
    off = train(on_policy_config(tmp_path, "off", student_dir, teacher_dir, sft_data, optim=optim))
    zero = train(
        on_policy_config(
            tmp_path, "zero", student_dir, teacher_dir, sft_data, {"lambda": 0.0}, optim=optim
        )
    )
    assert [r["loss"] for r in zero.history] == [r["loss"] for r in off.history]
    assert [r["on_policy"] for r in zero.history] == [0, 0, 0]
    a, b = load_model_dir(off.final_dir)[0], load_model_dir(zero.final_dir)[0]
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_lambda_one_trains_on_the_students_samples_and_the_loss_falls(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path, monkeypatch
):
    max_new = 12
    cfg = on_policy_config(
        tmp_path,
        "on",
        student_dir,
        teacher_dir,
        sft_data,
        {"lambda": 1.0, "max_new_tokens": max_new},
        optim={"lr": 1e-2, "steps": 10, "warmup_steps": 1},
    )
    seen = []
    original = Trainer.train_step

    def keep(self, batches):
        seen.append(batches)
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", keep)
    trainer = Trainer(cfg)
    result = trainer.run()

    data = {}  # prompt -> the data's responses (target tokens) for it
    for example in trainer.train_examples:
        first = next(t for t, y in enumerate(example.targets) if y != IGNORE_INDEX)
        prompt = tuple(example.input_ids[: first + 1])
        data.setdefault(prompt, set()).add(tuple(y for y in example.targets if y != IGNORE_INDEX))
    eos = trainer.tokenizer.eos_token_id
    for batches in seen:
        assert all(b.sampled for b in batches)
        for ids, targets in sequences(batches[0]):
            first = next(t for t, y in enumerate(targets) if y != IGNORE_INDEX)
            prompt, sampled = tuple(ids[: first + 1]), ids[first + 1 :]
            assert prompt in data  # a data example's prompt ...
            assert tuple(sampled) not in data[prompt]  # ... answered by the student, not the data
            assert [y for y in targets if y != IGNORE_INDEX] == sampled  # loss on every sample
            assert sampled[-1] == eos or len(sampled) == max_new
            assert eos not in sampled[:-1]  # cut at the first end-of-turn
    losses = [r["loss"] for r in result.history]
    assert all(math.isfinite(x) for x in losses) and all(
        r["on_policy"] == 1 for r in result.history
    )
    assert all(0 < r["sampled_length"] <= max_new for r in result.history)
    # The loss is taken on new samples every step, from a student whose samples change, so the
    # curve is noisy; what must fall is the KL to the teacher on fixed tokens: the first step's
    # samples, and the held-out data.
    untrained = load_model_dir(student_dir)[0]
    trained = load_model_dir(result.final_dir)[0]
    first_samples = seen[0]
    before = evaluate(untrained, first_samples, trainer.teacher)["kl"]
    after = evaluate(trained, first_samples, trainer.teacher)["kl"]
    assert after < 0.8 * before
    held_out = trainer.eval_batches()
    assert (
        evaluate(trained, held_out, trainer.teacher)["kl"]
        < 0.8 * evaluate(untrained, held_out, trainer.teacher)["kl"]
    )


def test_a_sample_is_finished_only_when_its_stop_token_survives_the_cuts():
    prompt, stop = [5, 6, 7], {2}
    finished, done = sampled_example(prompt, [9, 2, 4, 4], stop, 16, 0)
    assert done and finished.input_ids == [5, 6, 7, 9, 2]
    assert finished.targets == [IGNORE_INDEX, IGNORE_INDEX, 9, 2, IGNORE_INDEX]
    looping = [9, 9, 9, 9]
    kept, done = sampled_example(prompt, looping, stop, 16, 0)
    assert not done and kept.targets[2:6] == [9, 9, 9, 9]  # trained on by default
    dropped, done = sampled_example(prompt, looping, stop, 16, 0, drop_unfinished=True)
    assert not done and dropped.input_ids == kept.input_ids
    assert set(dropped.targets) == {IGNORE_INDEX}
    # A stop token cut off by the row length does not finish the sample.
    cut, done = sampled_example(prompt, [9, 2], stop, 4, 0, drop_unfinished=True)
    assert not done and cut.input_ids == [5, 6, 7, 9] and set(cut.targets) == {IGNORE_INDEX}


def test_dropping_unfinished_samples_trains_only_on_the_finished_ones(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path, monkeypatch
):
    """The teacher as its own student often ends within 6 tokens and sometimes not: finished
    samples keep their targets, unfinished ones lose them, and `unfinished` counts the latter."""
    seen = []
    original = Trainer.train_step

    def keep(self, batches):
        seen.append(batches)
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", keep)
    on_policy = {"lambda": 1.0, "max_new_tokens": 6, "drop_unfinished": True}
    cfg = on_policy_config(
        tmp_path, "drop", teacher_dir, teacher_dir, sft_data, on_policy, optim={"steps": 3}
    )
    trainer = Trainer(cfg)
    result = trainer.run()
    eos = trainer.tokenizer.eos_token_id
    prompts = {tuple(prompt_ids(e)) for e in trainer.train_examples}
    counts = {True: 0, False: 0}
    for batches, record in zip(seen, result.history, strict=True):
        finished_here = []
        for batch in batches:
            for ids, targets in sequences(batch):
                cut = max(n for n in range(len(ids)) if tuple(ids[:n]) in prompts)
                sampled = ids[cut:]
                finished = sampled[-1] == eos
                assert [y for y in targets if y != IGNORE_INDEX] == (sampled if finished else [])
                finished_here.append(finished)
                counts[finished] += 1
        share = 1 - sum(finished_here) / len(finished_here)
        assert record["unfinished"] == pytest.approx(share)
        assert record.get("skipped", 0) == (share == 1.0)
    assert counts[True] and counts[False], counts  # both kinds occurred


class Crash(Exception):
    pass


def crash_at_step_4_then_resume(config, monkeypatch):
    """Train `config`, crash inside its 4th optimizer step, then resume it; the resumed run."""
    original = Trainer.train_step

    def crash_at_step_4(self, batches):
        if self.step == 3:
            raise Crash
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_4)
    with pytest.raises(Crash):
        train(config)
    monkeypatch.setattr(Trainer, "train_step", original)
    return train(config, resume=True)


def test_a_resumed_on_policy_run_samples_and_trains_the_same(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path, monkeypatch
):
    # seed 2 and lambda 0.5 pick steps 3 and 4 (1-based) as on-policy: both after the checkpoint.
    sections = dict(seed=2, optim={"lr": 1e-2, "steps": 4}, checkpoint={"every": 2, "keep": 1})
    on_policy = {"lambda": 0.5, "max_new_tokens": 8}
    full = train(
        on_policy_config(
            tmp_path, "full", student_dir, teacher_dir, sft_data, on_policy, **sections
        )
    )
    assert [r["on_policy"] for r in full.history] == [0, 0, 1, 1]

    crashed = on_policy_config(
        tmp_path, "crashed", student_dir, teacher_dir, sft_data, on_policy, **sections
    )
    resumed = crash_at_step_4_then_resume(crashed, monkeypatch)
    assert [r["step"] for r in resumed.history] == [3, 4]
    for key in ("loss", "sampled_length"):
        assert [r[key] for r in resumed.history] == [r[key] for r in full.history[2:]]


# ------------------------------------------------ on-policy distillation: the signal itself
def reverse_kl_trainer(tmp_path, name, student, teacher_dir, data, lr=1e-2):
    """lambda 1, per-token reverse KL alone (alpha 1): on-policy distillation as current
    post-training pipelines run it (the student samples, the teacher's log-probs score it)."""
    raw = recipe(
        tmp_path / name,
        student,
        data,
        teacher={"model": str(teacher_dir)},
        objectives=[{"kind": "logits", "divergence": "reverse_kl", "alpha": 1.0}],
        optim={"lr": lr, "steps": 4, "warmup_steps": 0, "schedule": "constant"},
    )
    raw["on_policy"] = {"lambda": 1.0, "max_new_tokens": 16}
    return Trainer(validate(raw, name))


def reverse_kl_on(trainer: Trainer, batches) -> float:
    """Mean per-token KL(student || teacher) over the batches' loss positions (float64, from
    materialized logits: an independent path from the fused loss the trainer uses)."""
    from lmdistill.teachers.forward import forward_signals

    student = trainer.accelerator.unwrap_model(trainer.module).student
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            s, t = forward_signals(student, batch), trainer.teacher(batch)
            mask = batch.targets != IGNORE_INDEX
            log_q = (s.hidden[mask] @ s.head.T).double().log_softmax(-1)
            log_p = (t.hidden[mask] @ t.head.T).double().log_softmax(-1)
            total += float((log_q.exp() * (log_q - log_p)).sum())
            count += int(mask.sum())
    return total / count


def test_a_student_identical_to_the_teacher_gets_zero_loss_and_zero_gradient(
    tmp_path: Path, teacher_dir: Path, sft_data: Path
):
    trainer = reverse_kl_trainer(tmp_path, "same", teacher_dir, teacher_dir, sft_data)
    batches = trainer.step_batches(0)
    assert batches and all(b.sampled for b in batches)
    counts = trainer._global_counts(batches)
    for batch in batches:
        loss, _ = trainer.module(batch, trainer.teacher(batch), counts)
        loss.backward()
        assert abs(float(loss.detach())) < 1e-5
    grads = [p.grad for p in trainer.module.parameters() if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) < 1e-5


def test_a_reverse_kl_step_on_fixed_samples_lowers_that_reverse_kl(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path
):
    trainer = reverse_kl_trainer(tmp_path, "step", student_dir, teacher_dir, sft_data)
    batches = trainer.step_batches(0)
    curve = [reverse_kl_on(trainer, batches)]
    for _ in range(3):
        record = trainer.train_step(batches)
        # The trainer's own loss on the step is the same quantity, through the fused loss.
        assert record["loss"] == pytest.approx(curve[-1], rel=1e-4)
        curve.append(reverse_kl_on(trainer, batches))
    assert all(b < a for a, b in itertools.pairwise(curve)), curve
    assert curve[-1] < 0.9 * curve[0], curve


def test_sampled_tokens_line_up_with_the_teachers_log_probs_token_by_token(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path
):
    """Each sampled token's target position holds the teacher's log-probs for exactly the prefix
    before it: the packed batch's teacher logits equal a plain, unpacked teacher forward over the
    prompt and the student's tokens, position by position, and the target there is the next
    sampled token."""
    trainer = reverse_kl_trainer(tmp_path, "align", student_dir, teacher_dir, sft_data)
    teacher, _ = load_model_dir(teacher_dir)
    checked = 0
    for batch in trainer.step_batches(0):
        packed = trainer.teacher(batch)
        packed_logits = packed.hidden @ packed.head.T
        for row, (pos, real) in enumerate(zip(batch.position_ids, batch.real, strict=True)):
            starts = [int(t) for t in torch.nonzero((pos == 0) & real).flatten()]
            for a, b in zip(starts, [*starts[1:], int(real.sum())], strict=True):
                ids, targets = batch.input_ids[row, a:b], batch.targets[row, a:b]
                with torch.no_grad():
                    alone = teacher(input_ids=ids[None]).logits[0]
                for t in torch.nonzero(targets != IGNORE_INDEX).flatten().tolist():
                    assert int(targets[t]) == int(ids[t + 1])
                    torch.testing.assert_close(
                        packed_logits[row, a + t].log_softmax(-1),
                        alone[t].log_softmax(-1),
                        rtol=1e-4,
                        atol=1e-4,
                    )
                    checked += 1
    assert checked > 20


# ------------------------------------ speculative proposal (SKD): the student proposes, the teacher vets
def test_the_speculative_mixture_is_the_distribution_of_propose_and_vet():
    """p(x) = q(x)[x in K] + (1 - q(K)) t(x) is what "sample x ~ q; keep x if it is among the
    teacher's top k, else draw from t" gives: checked by simulating that procedure."""
    from lmdistill.training.on_policy import speculative_mixture

    gen = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(1, 12, generator=gen) * 2, -1)
    t = torch.softmax(torch.randn(1, 12, generator=gen) * 2, -1)
    p, kept_mass = speculative_mixture(q, t, top_k=4)
    torch.testing.assert_close(p.sum(-1), torch.ones(1))
    top = set(t[0].topk(4).indices.tolist())
    assert float(kept_mass[0]) == pytest.approx(float(q[0, sorted(top)].sum()))
    draws = 200_000
    proposals = torch.multinomial(q[0], draws, replacement=True, generator=gen)
    fallbacks = torch.multinomial(t[0], draws, replacement=True, generator=gen)
    kept = torch.tensor([int(x) in top for x in proposals.tolist()])
    tokens = torch.where(kept, proposals, fallbacks)
    empirical = torch.bincount(tokens, minlength=12).double() / draws
    torch.testing.assert_close(empirical, p[0].double(), atol=4e-3, rtol=0)
    # The two ends: a teacher that vets nothing out leaves the student alone; a student whose
    # mass lies wholly outside the teacher's top k is replaced by the teacher.
    torch.testing.assert_close(speculative_mixture(q, t, top_k=12)[0], q)
    outside = torch.zeros_like(q)
    outside[0, t[0].argmin()] = 1.0
    torch.testing.assert_close(speculative_mixture(outside, t, top_k=4)[0], t)


def test_speculative_generation_reads_each_row_like_a_plain_forward(
    student_dir: Path, teacher_dir: Path
):
    """With KV caches, left padding and per-row positions, the logits each model gives at every
    sampled step equal an uncached forward of that row alone, unpadded; a stopped row gets pads."""
    from lmdistill.training.on_policy import speculative_generate

    student, _ = load_model_dir(student_dir)
    teacher, tokenizer = load_model_dir(teacher_dir)
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, k=k: seen[k].append(out.logits[:, -1]))
        for k, m in (("student", student), ("teacher", teacher))
    ]
    prompts = [tokenizer("the cat sat")["input_ids"], tokenizer("a")["input_ids"]]
    width = max(map(len, prompts))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    torch.manual_seed(0)
    tokens, (kept, offered) = speculative_generate(
        student.eval(),
        teacher.eval(),
        ids,
        mask,
        max_new_tokens=6,
        top_k=5,
        temperature=1.0,
        top_p=1.0,
        stop_ids={-1},  # never stops: every step is checked
        pad_id=0,
    )
    for h in hooks:
        h.remove()
    assert tokens.shape == (2, 6) and 0.0 <= kept <= offered == 12
    for name, model in (("student", student), ("teacher", teacher)):
        steps = torch.stack(seen[name], dim=1)  # (rows, steps, vocab)
        for row, prompt in enumerate(prompts):
            full = torch.tensor(prompt + tokens[row].tolist())[None]
            with torch.no_grad():
                alone = model(input_ids=full).logits[0]
            for step in range(6):
                torch.testing.assert_close(
                    steps[row, step], alone[len(prompt) - 1 + step], rtol=1e-4, atol=1e-4
                )


def test_a_speculative_on_policy_run_keeps_every_proposal_of_an_identical_teacher(
    tmp_path: Path, teacher_dir: Path, sft_data: Path
):
    """Student = teacher and the teacher's top k = the whole vocabulary: every proposal is kept
    (proposal_kept 1) and the reverse KL is 0; with a top 1 of a different student, some are not."""
    vocab = load_model_dir(teacher_dir)[0].get_output_embeddings().weight.size(0)
    on_policy = {
        "lambda": 1.0,
        "max_new_tokens": 12,
        "proposal": "speculative",
        "teacher_top_k": vocab,
    }
    same = train(
        on_policy_config(
            tmp_path, "same", teacher_dir, teacher_dir, sft_data, on_policy, optim={"steps": 2}
        )
    )
    assert [r["proposal_kept"] for r in same.history] == pytest.approx([1.0, 1.0])
    assert all(abs(r["loss/logits"]) < 1e-5 for r in same.history)


def test_a_speculative_run_vets_a_weak_students_tokens(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path
):
    on_policy = {"lambda": 1.0, "max_new_tokens": 12, "proposal": "speculative", "teacher_top_k": 1}
    run = train(
        on_policy_config(
            tmp_path, "weak", student_dir, teacher_dir, sft_data, on_policy, optim={"steps": 2}
        )
    )
    kept = [r["proposal_kept"] for r in run.history]
    assert all(0.0 < k < 0.9 for k in kept), kept
    assert all(math.isfinite(r["loss"]) for r in run.history)


# ------------------------------------------ DistiLLM: replayed samples, the adaptive schedule
def test_a_replay_run_trains_on_earlier_samples_once_its_buffer_is_full(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path, monkeypatch
):
    cfg = on_policy_config(
        tmp_path,
        "replay",
        student_dir,
        teacher_dir,
        sft_data,
        {"lambda": 1.0, "max_new_tokens": 8, "replay": 4},
        optim={"lr": 1e-2, "steps": 8, "warmup_steps": 1},
    )
    seen = []
    original = Trainer.train_step

    def keep(self, batches):
        seen.append((self._step_kind, [s for b in batches for s in sequences(b)]))
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", keep)
    result = Trainer(cfg).run()
    kinds = [kind for kind, _ in seen]
    assert kinds[0] == "fresh" and "replay" in kinds  # filled first, then drawn from
    assert [r.get("replayed", 0) for r in result.history] == [int(k == "replay") for k in kinds]
    sampled_so_far: set = set()
    for kind, samples in seen:
        as_tuples = {(tuple(i), tuple(t)) for i, t in samples}
        if kind == "replay":  # every replayed example is one the student sampled earlier
            assert as_tuples <= sampled_so_far
        else:
            sampled_so_far |= as_tuples


def test_a_resumed_replay_run_draws_from_the_same_buffer(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path, monkeypatch
):
    sections = dict(optim={"lr": 1e-2, "steps": 6}, checkpoint={"every": 3, "keep": 1})
    on_policy = {"lambda": 1.0, "max_new_tokens": 8, "replay": 3}
    full = train(
        on_policy_config(
            tmp_path, "full", student_dir, teacher_dir, sft_data, on_policy, **sections
        )
    )
    assert any(r.get("replayed") for r in full.history[3:])
    crashed = on_policy_config(
        tmp_path, "crashed", student_dir, teacher_dir, sft_data, on_policy, **sections
    )
    resumed = crash_at_step_4_then_resume(crashed, monkeypatch)
    for key in ("loss", "sampled_length", "replayed"):
        assert [r.get(key) for r in resumed.history] == [r.get(key) for r in full.history[3:]]


def sampler_of(student_dir: Path, total_steps: int, **settings):
    from transformers import AutoTokenizer

    from lmdistill.training.config import OnPolicy
    from lmdistill.training.on_policy import OnPolicySampler

    return OnPolicySampler(
        OnPolicy(**settings),
        seed=0,
        tokenizer=AutoTokenizer.from_pretrained(student_dir),
        row_length=64,
        tokens_per_batch=256,
        packing=True,
        total_steps=total_steps,
    )


def test_with_a_full_buffer_fresh_samples_give_way_to_replayed_ones_over_the_run(
    student_dir: Path,
):
    from lmdistill.data.sft import Example

    sampler = sampler_of(student_dir, 1000, **{"lambda": 0.5, "replay": 2})
    assert sampler.kind(0) in ("data", "fresh")  # an empty buffer: nothing to replay yet
    assert "replay" not in {sampler.kind(s) for s in range(1000)}
    sampler.buffer.extend([Example([1, 2], [2, -100], 0), Example([3, 4], [4, -100], 1)])
    kinds = [sampler.kind(s) for s in range(1000)]
    assert 0.4 < sum(k != "data" for k in kinds) / 1000 < 0.6  # lambda: the on-policy share

    def fresh_share(part):
        on = [k for k in part if k != "data"]
        return sum(k == "fresh" for k in on) / len(on)

    # fresh with probability 1 - step/total among on-policy steps: ~0.95 early, ~0.05 late
    assert fresh_share(kinds[:100]) > 0.85 and fresh_share(kinds[-100:]) < 0.15


def test_the_adaptive_schedule_rises_only_when_the_held_out_loss_does(student_dir: Path):
    sampler = sampler_of(
        student_dir, 100, **{"lambda": 0.0, "adaptive": True, "adaptive_margin": 0.1}
    )
    assert all(sampler.kind(step) == "data" for step in range(100))  # starts at lambda 0
    rises = [sampler.observe(loss) for loss in (2.0, 1.5, 2.05, 2.15, 2.3, 2.35, 2.38)]
    # the reference is the first loss (2.0), then the loss at each rise (2.15, then 2.3)
    assert rises == [False, False, False, True, True, False, False]
    assert sampler.threshold == pytest.approx(0.2) and sampler.reference_loss == 2.3
    share = sum(sampler.kind(step) != "data" for step in range(100)) / 100
    assert 0.1 < share < 0.3
    for _ in range(20):
        sampler.observe(sampler.reference_loss + 1)
    assert sampler.threshold == 1.0


def test_an_adaptive_run_turns_on_policy_when_its_held_out_loss_rises(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path, monkeypatch
):
    cfg = on_policy_config(
        tmp_path,
        "adaptive",
        student_dir,
        teacher_dir,
        sft_data,
        {"lambda": 0.0, "max_new_tokens": 8, "adaptive": True},
        optim={"lr": 1e-2, "steps": 12, "warmup_steps": 1},
        eval={"every": 1},
    )
    original = Trainer.run_eval

    def worse_each_time(self):  # the real evaluation, its loss made to rise by 1 a step
        result = original(self)
        return {**result, "ce": result["ce"] + 1.0 * self.step}

    monkeypatch.setattr(Trainer, "run_eval", worse_each_time)
    result = Trainer(cfg).run()
    probability = [r["on_policy_probability"] for r in result.history]
    # each step logs the probability it was drawn with; the evaluation after it raises it
    assert probability == pytest.approx([min(0.1 * s, 1.0) for s in range(12)])
    assert result.history[0]["on_policy"] == 0 and sum(r["on_policy"] for r in result.history) > 3
    evals = [
        r for _, r in read_jsonl_tolerant(tmp_path / "adaptive" / "metrics.jsonl") if "eval/ce" in r
    ]
    assert evals[0]["step"] == 0  # the schedule's first reference


def test_an_adaptive_schedule_without_evaluations_is_refused(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path
):
    with pytest.raises(RecipeError, match=r"on_policy.*eval\.every > 0 and held-out data"):
        on_policy_config(tmp_path, "x", student_dir, teacher_dir, sft_data, {"adaptive": True})
