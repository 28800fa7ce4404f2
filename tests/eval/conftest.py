from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smaller tiny Llama (1 layer, other random weights) with the same tokenizer as
    `tiny_model_dir`: another shape, as a student is."""
    from tiny import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-student"), layers=1, seed=1)
