from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny Llama (other random weights) with the same tokenizer as `tiny_model_dir`."""
    from tiny import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-student"), seed=1)
