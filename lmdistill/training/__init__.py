"""Training students: one Accelerate loop with pluggable objectives (sft, logits, hidden), students
built from the teacher, and the typed recipe config."""

from lmdistill.training.config import TrainConfig, load_config
from lmdistill.training.loop import Trainer, TrainResult, train
from lmdistill.training.students import StudentInfo, spread_layers, student_from_teacher

__all__ = [
    "StudentInfo",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_config",
    "spread_layers",
    "student_from_teacher",
    "train",
]
