"""MBPP (Austin et al. 2021), 3-shot, exactly as lm-eval's `mbpp` task (`lm_eval/tasks/mbpp/mbpp.yaml`):
the PaLM-style prompt with task ids 2, 3, 4 as shots, generation until "[DONE]", pass@1 on the 3 asserts."""

from __future__ import annotations

from pathlib import Path

from gemmalab.errors import GemmalabError
from gemmalab.evaluate.tasks.base import Sample, Task, field_error, find_jsonl, read_jsonl

# lm-eval's `list_fewshot_samples()` (task ids 2, 3, 4 of the "prompt" split), verbatim: lm-eval hard-codes
# them, so the prompt does not depend on the data file; code keeps the dataset's \r\n line ends.
FEWSHOT = [
    {
        "task_id": 2,
        "text": "Write a function to find the similar elements from the given two tuple lists.",
        "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
                "  return (res) ",
        "test_list": ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
                      "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
                      "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)"],
    },
    {
        "task_id": 3,
        "text": "Write a python function to identify non-prime numbers.",
        "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):"
                "\r\n        if n % i == 0:\r\n            result = True\r\n    return result",
        "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True",
                      "assert is_not_prime(35) == True"],
    },
    {
        "task_id": 4,
        "text": "Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
        "code": "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
                "  return largest_nums",
        "test_list": ["assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
                      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
                      "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]"],
    },
]
TEST_IDS = range(11, 511)  # the "test" split: 500 problems (google-research mbpp README)
STOP = ("[DONE]",)
MAX_NEW_TOKENS = 256  # mbpp.yaml sets no max_gen_toks, so lm-eval's model default (256) applies
REQUIRED = ("task_id", "text", "code", "test_list")


def render_problem(text: str, test_list: list[str]) -> str:
    """lm-eval's `doc_to_text`: the task, its first three asserts, "[BEGIN]\\n"."""
    return (f"You are an expert Python programmer, and here is your task: {text} Your code should pass these "
            f"tests:\n\n{test_list[0]}\n{test_list[1]}\n{test_list[2]}\n[BEGIN]\n")


def render_prompt(shots: list[dict], row: dict) -> str:
    """Each shot is its problem, its code as stored (with the dataset's \\r\\n line ends, as lm-eval keeps them),
    "\\n[DONE]" and "\\n\\n" (target_delimiter is ""); then the problem ending in "[BEGIN]\\n"."""
    shot_text = "".join(f"{render_problem(s['text'], s['test_list'])}{s['code']}\n[DONE]\n\n" for s in shots)
    return shot_text + render_problem(row["text"], row["test_list"])


def check_program(sample: Sample, completion: str) -> str:
    """What lm-eval runs (HF code_eval: `candidate + "\\n" + reference`): the completion, a newline, and the
    first three asserts of `test_list` joined by newlines. `test_setup_code` and `challenge_test_list` are
    not used, as in lm-eval."""
    return completion + "\n" + sample.gold


def load_mbpp(path: Path) -> Task:
    """MBPP test problems (task ids 11-510, in id order) with lm-eval's 3 fixed shots (task ids 2, 3, 4).

    `path` is either google-research's `mbpp.jsonl` (all 974 rows, fields text, code, task_id,
    test_setup_code, test_list, challenge_test_list), or a folder holding the HF `mbpp` (config "full") test
    split exported to JSONL with the same fields: `test.jsonl` (other split files there are not read).
    Rows outside ids 11-510 are not evaluated. The shots are `FEWSHOT` (lm-eval's copy of rows 2, 3, 4);
    where the data holds those rows too, `info["fewshot_matches_data"]` says whether they agree.
    `info["problems"]` is the number of test problems (500 for the full set). Sample ids are the task ids.
    """
    path = Path(path)
    if path.is_dir():
        file = find_jsonl(path, "test")
        if file is None:
            raise GemmalabError(f"MBPP folder {path} has no test.jsonl (the HF test split).")
    else:
        file = path
    rows: dict[int, dict] = {}
    for line, obj in read_jsonl(file, required=REQUIRED):
        _check_row(file, line, obj)
        if obj["task_id"] in rows:
            raise field_error(file, line, f"task_id {obj['task_id']} appears twice.")
        rows[obj["task_id"]] = obj

    test_ids = sorted(i for i in rows if i in TEST_IDS)
    if not test_ids:
        raise GemmalabError(f"MBPP data {file} has no test problems (task ids 11-510).")
    samples = [Sample(id=str(i), prompt=render_prompt(FEWSHOT, rows[i]), gold="\n".join(rows[i]["test_list"][:3]),
                      data={"task_id": i, "test_list": rows[i]["test_list"],
                            "test_setup_code": rows[i].get("test_setup_code", "")}) for i in test_ids]
    keys = ("text", "code", "test_list")
    in_data = [s for s in FEWSHOT if s["task_id"] in rows]
    matches = all(all(rows[s["task_id"]][k] == s[k] for k in keys) for s in in_data) if in_data else None
    return Task(name="mbpp", kind="generate", samples=samples, metric="pass@1", stop=STOP,
                max_new_tokens=MAX_NEW_TOKENS, check_program=check_program,
                info={"source": str(file), "num_fewshot": 3, "fewshot_task_ids": [2, 3, 4],
                      "fewshot_matches_data": matches, "split": "test (task ids 11-510)", "problems": len(samples),
                      "protocol": "lm-eval mbpp"})


def _check_row(path: Path, line: int, obj: dict) -> None:
    if isinstance(obj["task_id"], bool) or not isinstance(obj["task_id"], int):
        raise field_error(path, line, f"task_id must be an integer, got {obj['task_id']!r}.")
    for key in ("text", "code"):
        if not isinstance(obj[key], str):
            raise field_error(path, line, f"{key} must be a string.")
    tests = obj["test_list"]
    if not (isinstance(tests, list) and len(tests) >= 3 and all(isinstance(t, str) for t in tests)):
        raise field_error(path, line, "test_list must be a list of at least 3 assert strings.")
