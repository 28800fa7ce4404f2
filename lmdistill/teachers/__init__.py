"""Teachers: one interface (`Teacher`) over every source of teacher signal."""

from lmdistill.teachers.base import (
    Capability,
    Failure,
    Generation,
    GenerationResult,
    Message,
    Prices,
    SamplingParams,
    Teacher,
)

__all__ = [
    "Capability",
    "Failure",
    "Generation",
    "GenerationResult",
    "Message",
    "Prices",
    "SamplingParams",
    "Teacher",
]
