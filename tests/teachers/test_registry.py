"""load_teacher: from a spec string to the right Teacher, or a one-line UserError."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmdistill.errors import UserError
from lmdistill.teachers.local import HFTeacher
from lmdistill.teachers.registry import is_api_spec, load_teacher


def test_model_dir_gives_a_local_teacher(tiny_model_dir: Path) -> None:
    teacher = load_teacher(str(tiny_model_dir), batch_size=3)
    assert isinstance(teacher, HFTeacher)
    assert teacher.batch_size == 3
    assert teacher.name == tiny_model_dir.name


def test_unknown_spec_names_it_and_lists_bundled_names() -> None:
    with pytest.raises(UserError) as error:
        load_teacher("no-such-teacher")
    message = str(error.value)
    assert "'no-such-teacher'" in message and "smollm2-135m-instruct" in message
    assert "\n" not in message


def test_existing_dir_without_a_model_is_explained(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"not a Hugging Face model dir \(no config\.json\)"):
        load_teacher(str(tmp_path))


def test_an_option_the_teacher_does_not_take_is_a_user_error(tiny_model_dir: Path) -> None:
    with pytest.raises(UserError, match=r"does not take option\(s\) concurrency"):
        load_teacher(str(tiny_model_dir), concurrency=4)


def test_openai_spec_gives_an_api_teacher(monkeypatch: pytest.MonkeyPatch) -> None:
    openai_api = pytest.importorskip("lmdistill.teachers.openai_api")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    teacher = load_teacher("openai:gpt-4o-mini", concurrency=2)
    assert isinstance(teacher, openai_api.OpenAITeacher)
    assert teacher.model == "gpt-4o-mini"


def test_openai_spec_needs_a_model() -> None:
    with pytest.raises(UserError, match="needs a model name"):
        load_teacher("openai:")


def test_api_specs_are_recognised() -> None:
    assert is_api_spec("openai:gpt-4o") and is_api_spec("http://127.0.0.1:8000/v1")
    assert not is_api_spec("smollm2-135m-instruct") and not is_api_spec("./models/x")


def test_url_spec_uses_the_servers_only_model(tiny_model_dir: Path) -> None:
    openai_api = pytest.importorskip("lmdistill.teachers.openai_api")
    from lmdistill.serve import create_app, running_server

    app = create_app(HFTeacher(tiny_model_dir), model_name="tiny-served")
    with running_server(app) as base_url:
        teacher = load_teacher(base_url)
        assert isinstance(teacher, openai_api.OpenAITeacher)
        assert teacher.model == "tiny-served"


def test_unreachable_url_is_a_user_error() -> None:
    pytest.importorskip("lmdistill.teachers.openai_api")
    # Port 9 (discard) on loopback: nothing listens there, so the connection is refused at once.
    with pytest.raises(UserError, match="could not reach the server"):
        load_teacher("http://127.0.0.1:9/v1", timeout_s=2.0)


def test_vllm_spec_without_vllm_is_a_clear_error() -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    with pytest.raises(UserError, match=r"needs vLLM.*pip install"):
        load_teacher("vllm:smollm2-135m-instruct")


def test_check_teacher_resolves_a_spec_without_loading_it(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a recipe check asks: the same resolution as load_teacher, no weights, no request."""
    from lmdistill.teachers.base import Capability
    from lmdistill.teachers.registry import check_teacher

    def no_load(*args, **kwargs):
        raise AssertionError("check_teacher must not load a model")

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert Capability.FULL_LOGITS in check_teacher(str(tiny_model_dir), batch_size=2)
    assert check_teacher("http://127.0.0.1:9/v1") == Capability.TEXT  # nothing listens there
    with pytest.raises(UserError, match="not a well-formed URL"):
        check_teacher("http://:8000/v1")
    with pytest.raises(UserError, match=r"does not take option\(s\) concurrency"):
        check_teacher(str(tiny_model_dir), concurrency=2)
    with pytest.raises(UserError, match=r"set \$OPENAI_API_KEY"):
        check_teacher("openai:gpt-4o-mini")
    with pytest.raises(UserError, match=r"\(did you mean smollm2-135m-instruct\?\)"):
        check_teacher("smollm2-135m-instrct")
