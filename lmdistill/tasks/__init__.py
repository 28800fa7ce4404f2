"""Verifiable tasks: one `Task` shape for evaluation, trace filtering and self-distillation rewards
(see `base.py`), the built-in tasks, and `get_task` to name them."""

from lmdistill.tasks.base import Example, Split, Task
from lmdistill.tasks.registry import get_task, task_names

__all__ = ["Example", "Split", "Task", "get_task", "task_names"]
