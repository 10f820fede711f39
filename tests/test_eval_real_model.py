"""The real Gemma 3 270M through the evaluation harness: MMLU-format questions it should mostly get right, and
HumanEval programs of its own run in the sandbox."""

import csv
import json

import pytest

from gemmalab.evaluate import evaluate, load_task
from gemmalab.evaluate.requests import encode_pair
from gemmalab.inference import Engine

pytestmark = pytest.mark.real_model

DEV = [("What is 1 + 1?", "1", "2", "3", "4", "B"), ("What color is the sky on a clear day?", "Green", "Red", "Blue",
        "Black", "C"), ("How many legs does a dog have?", "Four", "Two", "Six", "Eight", "A"),
       ("Which is a fruit?", "Carrot", "Potato", "Onion", "Apple", "D"), ("What is 10 - 3?", "7", "6", "8", "13", "A")]
TEST = [("What is the capital of France?", "Berlin", "Madrid", "Paris", "Rome", "C"),
        ("What is 2 + 2?", "3", "4", "5", "22", "B"), ("Which animal says moo?", "Cow", "Cat", "Dog", "Duck", "A"),
        ("How many days are in a week?", "Five", "Ten", "Twelve", "Seven", "D")]


def test_mmlu_format_on_the_real_model(real_model, tmp_path):
    for split, rows in (("dev", DEV), ("test", TEST)):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        with open(tmp_path / "mmlu" / split / f"global_facts_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    model, tokenizer = real_model
    engine = Engine(model, tokenizer, max_batch_size=4)
    task = load_task("mmlu", tmp_path)
    result = evaluate(engine, [task], tmp_path / "out", model="gemma3-270m", progress=False)
    records = [json.loads(line) for line in (tmp_path / "out" / "samples" / "mmlu.jsonl").read_text().splitlines()]
    first = task.samples[0]
    assert first.prompt.startswith("The following are multiple choice questions (with answers) about global facts.")
    assert records[0]["loglikelihoods"] == [engine.score([encode_pair(tokenizer, first.prompt, c)])[0].logprob
                                            for c in first.choices]
    # A 270M base model leans to one letter (" B" here), yet gets the capital of France (" C") and 2 + 2: its
    # answers follow the questions, not only its letter bias.
    assert result["tasks"]["mmlu"]["value"] >= 0.5 and len({r["pred"] for r in records}) > 1
    assert result["tasks"]["mmlu"]["groups"]["other"]["n"] == 4


def test_humaneval_completions_of_the_real_model_run_in_the_sandbox(real_model, tmp_path):
    model, tokenizer = real_model
    task = load_task("humaneval")
    task.samples, task.max_new_tokens = task.samples[:2], 48  # short: a check of the path, not a score
    result = evaluate(Engine(model, tokenizer), [task], tmp_path, model="gemma3-270m", allow_code_execution=True,
                      progress=False)
    records = [json.loads(line) for line in (tmp_path / "samples" / "humaneval.jsonl").read_text().splitlines()]
    for rec in records:
        out = rec["outputs"][0]
        assert out["text"] and not any(stop in out["text"] for stop in task.stop)
        assert out["status"] in ("passed", "failed", "timeout")
    assert result["tasks"]["humaneval"]["value"] == sum(r["outputs"][0]["passed"] for r in records) / 2
