"""Our harness and lm-evaluation-harness (through the `gemmalab` adapter) give the same per-item log-likelihoods,
the same choices and the same accuracy, on lm-eval's own task definitions (MMLU's template, ARC, WinoGrande)
pointed at local copies of the same rows."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import gemmalab  # noqa: E402
import gemmalab.evaluate.lm_eval  # noqa: E402,F401  (registers --model gemmalab)
from gemmalab.evaluate import evaluate, load_task  # noqa: E402
from gemmalab.inference import Engine  # noqa: E402

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
WORDS = "abc def ghi jkl mno pqr stu vwx yza bcd efg hij klm nop qrs tuv wxy zab".split()


def word(i: int) -> str:
    return WORDS[i % len(WORDS)]


SUBJECTS = ("abstract_algebra", "world_religions")
MMLU = {s: {split: [{"question": f"  {word(i)} {word(3 * i + k)} {split} {i}?  ", "subject": s,
                     "choices": [word(i + 1), f"{word(i + 2)} {i}", word(i + 5), "none of these"], "answer": (i + k) % 4}
                    for i in range(n)] for split, n in (("dev", 5), ("test", 4))} for k, s in enumerate(SUBJECTS)}
ARC = [{"id": f"a{i}", "question": f"{word(i)} {word(i + 7)} {word(2 * i)}", "answerKey": "ABC"[i % 3],
        "choices": {"text": [word(i + 1), word(i + 4), f"{word(i)} {word(i + 9)}"], "label": ["A", "B", "C"]}}
       for i in range(6)]
WINOGRANDE = [{"sentence": f"{word(i)} {word(i + 1)} because _ {word(i + 2)} {word(i + 3)}.", "option1": word(i + 5),
               "option2": word(i + 6), "answer": "12"[i % 2]} for i in range(4)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("crosscheck")
    torch.manual_seed(0)
    model = gemmalab.Gemma(replace(gemmalab.get_preset("tiny-gemma"), max_seq_len=1024))  # room for 5 shots
    model.init_weights(std=0.3, seed=0)
    model_dir = gemmalab.save_hf(model, root / "model", tokenizer=tiny_tokenizer)
    data, yamls = root / "data", root / "yaml"
    yamls.mkdir()
    configs = {}
    for s in SUBJECTS:  # lm-eval's MMLU template (5-shot, first_n dev) over our local rows
        files = {split: str(write_jsonl(data / "mmlu" / s / f"{split}.jsonl", MMLU[s][split])) for split in ("dev", "test")}
        configs[f"x_mmlu_{s}"] = {"include": str(LM_EVAL_TASKS / "mmlu/default/_default_template_yaml"),
                                  "dataset_path": "json", "dataset_kwargs": {"data_files": files},
                                  "description": f"The following are multiple choice questions (with answers) about "
                                                 f"{s.replace('_', ' ')}.\n\n", "num_fewshot": 5}
    arc = write_jsonl(data / "arc_easy" / "test.jsonl", ARC)
    configs["x_arc_easy"] = {"include": str(LM_EVAL_TASKS / "arc/arc_easy.yaml"), "dataset_path": "json",
                             "dataset_name": None, "dataset_kwargs": {"data_files": {"test": str(arc)}},
                             "training_split": None, "validation_split": None, "test_split": "test"}
    wino = write_jsonl(data / "winogrande" / "validation.jsonl", WINOGRANDE)
    configs["x_winogrande"] = {"include": str(LM_EVAL_TASKS / "winogrande/default.yaml"), "dataset_path": "json",
                               "dataset_name": None, "dataset_kwargs": {"data_files": {"validation": str(wino)}},
                               "training_split": None}
    for name, config in configs.items():
        (yamls / f"{name}.yaml").write_text(json.dumps({"task": name, **config}))
    run = lm_eval.simple_evaluate(model="gemmalab", model_args=f"pretrained={model_dir}", tasks=list(configs),
                                  batch_size=1, log_samples=True, task_manager=TaskManager(include_path=str(yamls)))
    loaded, tokenizer = gemmalab.load(model_dir)
    engine = Engine(loaded, tokenizer, max_batch_size=1)  # the batch size lm-eval used: bit-identical scores
    ours = evaluate(engine, [load_task(t, data) for t in ("mmlu", "arc_easy", "winogrande")], root / "ours",
                    model=str(model_dir), progress=False)
    return run, ours, root / "ours" / "samples"


def records(folder: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{task}.jsonl").read_text().splitlines()]


def theirs(run: dict, task: str) -> list[dict]:
    return sorted(run["samples"][task], key=lambda s: s["doc_id"])


def test_mmlu_prompts_scores_and_accuracy_equal_lm_eval(setup):
    run, ours, folder = setup
    recs = records(folder, "mmlu")
    hits = 0
    for s in SUBJECTS:
        mine = [r for r in recs if r["id"].startswith(s + "/")]
        lm = theirs(run, f"x_mmlu_{s}")
        assert len(mine) == len(lm) == 4
        for r, t in zip(mine, lm):
            assert [tuple(a) for a in t["arguments"]] == [(r["prompt"], c) for c in (" A", " B", " C", " D")]
            assert r["loglikelihoods"] == [resp[0][0] for resp in t["resps"]]
            assert r["metrics"]["acc"] == t["acc"]
            hits += t["acc"]
    assert ours["tasks"]["mmlu"]["value"] == pytest.approx(hits / 8)  # micro-average, as lm-eval's group
    assert ours["tasks"]["mmlu"]["groups"]["abstract_algebra"]["acc"] == run["results"]["x_mmlu_abstract_algebra"]["acc,none"]


@pytest.mark.parametrize("task", ["arc_easy", "winogrande"])
def test_multiple_choice_scores_equal_lm_eval(setup, task):
    run, ours, folder = setup
    mine, lm = records(folder, task), theirs(run, f"x_{task}")
    assert len(mine) == len(lm)
    for r, t in zip(mine, lm):
        assert r["loglikelihoods"] == [resp[0][0] for resp in t["resps"]]
        assert r["metrics"]["acc"] == t["acc"]
        if "acc_norm" in t:
            assert r["metrics"]["acc_norm"] == t["acc_norm"]
    assert ours["tasks"][task]["metrics"]["acc"] == pytest.approx(run["results"][f"x_{task}"]["acc,none"])
