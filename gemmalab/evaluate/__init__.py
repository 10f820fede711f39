"""Evaluation: benchmark tasks over the inference engine, a sandbox for generated code, lm-eval integration."""

from gemmalab.evaluate.harness import evaluate
from gemmalab.evaluate.tasks import Sample, Task, available_tasks, load_task

__all__ = ["Sample", "Task", "available_tasks", "evaluate", "load_task"]
