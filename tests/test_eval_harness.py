"""The evaluation harness: declared multiple-choice tasks, per-sample records, resumption, result.json, the CLI."""

import json

import pytest
import torch

from gemmalab.cli import main
from gemmalab.errors import GemmalabError
from gemmalab.evaluate import evaluate, load_task
from gemmalab.evaluate.requests import encode_pair
from gemmalab.evaluate.tasks.choice import builtin_specs, load_choice_task
from gemmalab.inference import Engine
from gemmalab.model import Gemma, get_preset

ARC = [{"id": f"q{i}", "question": f"which word number {i} comes first", "answerKey": "AB"[i % 2],
        "choices": {"text": ["abc def", f"ghi {i}"], "label": ["A", "B"]}} for i in range(7)]
WINOGRANDE = [{"sentence": "the dog chased the cat because _ was fast.", "option1": "the dog", "option2": "the cat",
               "answer": "1"}]
HELLASWAG = [{"activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he [title] puts them",
              "endings": ["in a pan.", "on [header] the roof."], "label": "0"}]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    model = Gemma(get_preset("tiny-gemma"))
    model.init_weights(std=0.3, seed=0)
    return Engine(model.eval(), tiny_tokenizer, max_batch_size=4)


@pytest.fixture
def data_dir(tmp_path):
    write_jsonl(tmp_path / "arc_easy" / "test.jsonl", ARC)
    write_jsonl(tmp_path / "winogrande" / "validation.jsonl", WINOGRANDE)
    write_jsonl(tmp_path / "hellaswag" / "validation.jsonl", HELLASWAG)
    return tmp_path


def test_builtin_tasks_render_rows_as_lm_eval_does(data_dir):
    arc = load_task("arc_easy", data_dir)
    assert arc.samples[1].prompt == "Question: which word number 1 comes first\nAnswer:"
    assert arc.samples[1].choices == ["abc def", "ghi 1"] and arc.samples[1].gold == 1
    assert arc.target_delimiter == " "
    wino = load_task("winogrande", data_dir).samples[0]  # partial scoring: options are contexts
    assert wino.contexts == ["the dog chased the cat because the dog", "the dog chased the cat because the cat"]
    assert wino.choices == ["was fast."] and wino.gold == 0
    hella = load_task("hellaswag", data_dir).samples[0]  # lm-eval's preprocess: brackets gone, ctx_b capitalized
    assert hella.prompt == "Cooking: A man cuts onions. He. puts them"
    assert hella.choices == ["in a pan.", "on the roof."]
    assert set(builtin_specs()) >= {"arc_easy", "arc_challenge", "piqa", "boolq", "siqa", "openbookqa", "hellaswag",
                                    "winogrande", "commonsense_qa"}


def test_choice_scores_are_the_log_likelihoods_of_each_choice(engine, data_dir, tmp_path):
    task = load_task("arc_easy", data_dir)
    result = evaluate(engine, [task], tmp_path / "run", model="tiny", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "samples" / "arc_easy.jsonl").read_text().splitlines()]
    assert len(records) == len(ARC)
    hits = 0
    for s, rec in zip(task.samples, records):
        direct = [engine.score([encode_pair(engine.tokenizer, s.prompt, " " + c)])[0].logprob for c in s.choices]
        assert rec["loglikelihoods"] == direct  # exactly: the batch size never changes a score
        pred = max(range(len(direct)), key=direct.__getitem__)
        hits += pred == s.gold
        norm = max(range(len(direct)), key=lambda i: direct[i] / len(s.choices[i]))
        assert rec["metrics"] == {"acc": float(pred == s.gold), "acc_norm": float(norm == s.gold)}
    assert result["tasks"]["arc_easy"]["value"] == pytest.approx(hits / len(ARC))
    assert result["headline"]["arc_easy"] == {"acc": result["tasks"]["arc_easy"]["value"]}
    # partial scoring: the same continuation after each context
    wino = load_task("winogrande", data_dir)
    evaluate(engine, [wino], tmp_path / "run", model="tiny", progress=False)
    rec = json.loads((tmp_path / "run" / "samples" / "winogrande.jsonl").read_text())
    s = wino.samples[0]
    assert rec["loglikelihoods"] == [engine.score([encode_pair(engine.tokenizer, c, " was fast.")])[0].logprob
                                     for c in s.contexts]
    both = json.loads((tmp_path / "run" / "result.json").read_text())
    assert set(both["headline"]) == {"arc_easy", "winogrande"}  # tasks run one after the other share result.json


def test_an_interrupted_run_resumes_and_other_settings_are_refused(engine, data_dir, tmp_path):
    task = load_task("arc_easy", data_dir)
    full = evaluate(engine, [task], tmp_path / "a", model="tiny", progress=False)
    samples_file = tmp_path / "a" / "samples" / "arc_easy.jsonl"
    lines = samples_file.read_text().splitlines()
    samples_file.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # killed mid-write
    calls = []
    original = engine.score
    engine.score = lambda pairs, **kw: calls.append(len(pairs)) or original(pairs, **kw)
    try:
        again = evaluate(engine, [task], tmp_path / "a", model="tiny", progress=False)
    finally:
        engine.score = original
    assert sum(calls) == 2 * (len(ARC) - 3)  # only the 4 unfinished samples ran again
    assert again["tasks"]["arc_easy"]["metrics"] == full["tasks"]["arc_easy"]["metrics"]
    assert len(samples_file.read_text().splitlines()) == len(ARC)
    with pytest.raises(GemmalabError, match="other settings"):
        evaluate(engine, [task], tmp_path / "a", model="tiny", limit=2, progress=False)


def test_bad_task_files_name_the_file_and_line(data_dir, tmp_path):
    bad = tmp_path / "arc_easy" / "test.jsonl"
    bad.write_text(json.dumps(ARC[0]) + "\n{not json\n")
    with pytest.raises(GemmalabError, match=r"test.jsonl, line 2: not valid JSON"):
        load_task("arc_easy", tmp_path)
    bad.write_text(json.dumps({**ARC[0], "answerKey": "C"}) + "\n")
    with pytest.raises(GemmalabError, match=r"test.jsonl, line 1: task arc_easy cannot render"):
        load_task("arc_easy", tmp_path)
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(GemmalabError, match=r"line 1: .*choices"):
        load_task("arc_easy", tmp_path)
    with pytest.raises(GemmalabError, match="does not exist"):
        load_task("piqa", tmp_path)
    with pytest.raises(GemmalabError, match="Unknown task 'nope'"):
        load_task("nope", tmp_path)
    spec = tmp_path / "mine.toml"
    spec.write_text('data = "x.jsonl"\ndoc_to_text = "{{q}}"\ndoc_to_choice = "{{c}}"\ndoc_to_target = "g"\nshots = 3\n')
    with pytest.raises(GemmalabError, match="unknown field.*shots"):
        load_task(str(spec))
    spec.write_text('data = "x.jsonl"\ndoc_to_text = "{{q}}"\ndoc_to_choice = "{{c}}"\ndoc_to_target = "g"\n')
    write_jsonl(tmp_path / "x.jsonl", [{"q": "a", "c": ["x", "y"], "g": 5}])
    with pytest.raises(GemmalabError, match=r"x.jsonl, line 1: .*not one of the 2 choices"):
        load_task(str(spec))


@pytest.mark.parametrize("template,message", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError: access to attribute '__class__'"),
    ("{{ q.__class__ }}", "SecurityError: access to attribute '__class__'"),
    ("{% set l = [1] %}{{ l.append(2) }}", "SecurityError: access to attribute 'append'"),
    ("{{ 'a' * 10**10 }}", "SecurityError: `\\*` would make 10,000,000,000 items"),
    ("{{ 9 ** (10**9) }}", "SecurityError: `\\*\\*` would make a number of more than"),
    ("{{ range(10**9) | list }}", "OverflowError: Range too big"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
])
def test_task_templates_run_sandboxed(tmp_path, template, message):
    """A task TOML's templates cannot walk to Python's internals, change the row, or allocate without bound: each is
    a named error for the file and line (the templates ran in a plain Jinja environment)."""
    spec = tmp_path / "mine.toml"
    spec.write_text(f'data = "x.jsonl"\ndoc_to_text = "{template}"\ndoc_to_choice = "c"\ndoc_to_target = "g"\n')
    write_jsonl(tmp_path / "x.jsonl", [{"q": "a", "c": ["x", "y"], "g": 0}])
    with pytest.raises(GemmalabError, match=rf"x.jsonl, line 1: task mine cannot render this row: {message}"):
        load_task(str(spec))


@pytest.mark.parametrize("field,value,message", [
    ("num_fewshot", '"x"', "field num_fewshot must be a whole number >= 0, got 'x'"),
    ("num_fewshot", "-1", "field num_fewshot must be a whole number >= 0, got -1"),
    ("num_fewshot", "true", "field num_fewshot must be a whole number >= 0, got True"),
    ("data", "5", "field data must be str, got 5"),
    ("partial", '"yes"', "field partial must be bool, got 'yes'"),
])
def test_task_toml_fields_have_their_types(tmp_path, field, value, message):
    body = {"data": '"x.jsonl"', "doc_to_text": '"q"', "doc_to_choice": '"c"', "doc_to_target": '"g"', field: value}
    spec = tmp_path / "mine.toml"
    spec.write_text("".join(f"{k} = {v}\n" for k, v in body.items()))
    with pytest.raises(GemmalabError, match=rf"mine.toml, task mine: {message}"):
        load_task(str(spec))


def test_user_task_toml_with_few_shot_examples(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"q": f"s{i}", "c": ["no", "yes"], "g": i % 2} for i in range(4)])
    write_jsonl(tmp_path / "test.jsonl", [{"q": "t", "c": ["no", "yes"], "g": 1}])
    spec = tmp_path / "yesno.toml"
    spec.write_text('data = "test.jsonl"\nfewshot_data = "train.jsonl"\nnum_fewshot = 2\ndescription = "Say.\\n\\n"\n'
                    'doc_to_text = "Q: {{q}}\\nA:"\ndoc_to_choice = "c"\ndoc_to_target = "g"\n')
    task = load_choice_task(__import__("gemmalab.evaluate.tasks.choice", fromlist=["read_spec"]).read_spec(spec), tmp_path)
    assert task.name == "yesno"
    assert task.samples[0].prompt == "Say.\n\nQ: s0\nA: no\n\nQ: s1\nA: yes\n\nQ: t\nA:"


def test_cli_eval_writes_result_json_and_refuses_code_without_permission(tiny_tokenizer, data_dir, tmp_path, capsys):
    from gemmalab.checkpoint import save_hf

    torch.manual_seed(0)
    model = Gemma(get_preset("tiny-gemma"))
    model.init_weights(std=0.3, seed=0)
    save_hf(model, tmp_path / "model", tokenizer=tiny_tokenizer)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tmp_path / "model"), "--tasks", "arc_easy,winogrande", "--data-dir",
                 str(data_dir), "--limit", "5", "--out", str(out), "--batch-size", "3"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["tasks"]["arc_easy"]["n"] == 5 and result["tasks"]["winogrande"]["n"] == 1
    assert "arc_easy" in capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "model"), "--tasks", "humaneval", "--out", str(out)]) == 2
    assert "--allow-code-execution" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "model"), "--tasks", "arc_easy", "--out", str(out)]) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_eval_resume_is_keyed_on_the_weights_dtype_and_quantization(tiny_tokenizer, data_dir, tmp_path, capsys):
    """The same --model path with rewritten weights, another --dtype or --quantize: the recorded samples are refused
    (naming what differs and suggesting another --out), not mixed into the new results."""
    import os

    from gemmalab.checkpoint import save_hf

    model = Gemma(get_preset("tiny-gemma"))
    model.init_weights(std=0.3, seed=0)
    save_hf(model, tmp_path / "model", tokenizer=tiny_tokenizer)
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tmp_path / "model"), "--tasks", "arc_easy", "--data-dir", str(data_dir),
            "--limit", "2", "--out", str(out)]
    assert main(argv) == 0
    assert main(argv) == 0  # the same model and settings: resumes (nothing left to do)
    capsys.readouterr()
    for extra in (["--dtype", "bf16"], ["--quantize", "int8"]):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert "holds a run with other settings (model_identity differ). Use another --out" in err
    model.init_weights(std=0.3, seed=1)  # new weights at the same path, same sizes
    save_hf(model, tmp_path / "model", tokenizer=tiny_tokenizer)
    weights = tmp_path / "model" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # whatever the clock
    assert main(argv) == 2
    assert "model_identity differ" in capsys.readouterr().err


def test_the_fingerprint_covers_golds_and_sandbox_limits():
    from gemmalab.evaluate.harness import _fingerprint
    from gemmalab.evaluate.sandbox import Limits
    from gemmalab.evaluate.tasks.base import Sample, Task

    task = Task("t", "generate", [Sample("a", "p", gold="x")], metric="pass@1", check_program=lambda s, c: c)
    base = _fingerprint(task, task.samples, "m", 0, None, Limits())
    assert _fingerprint(task, task.samples, "m", 0, None, Limits(timeout_s=30.0)) != base
    assert _fingerprint(task, [Sample("a", "p", gold="y")], "m", 0, None, Limits()) != base


class ScriptedEngine:
    """Test double for generation: answers each prompt with a given completion (records what it was asked)."""

    max_batch_size = 4

    def __init__(self, answers):
        self.answers, self.asked = answers, []

    def generate(self, prompts, params):
        from gemmalab.inference import Completion

        self.asked += [(p, sp) for p, sp in zip(prompts, params)]
        return [Completion([], [], self.answers(p), "stop") for p in prompts]


def test_code_tasks_run_completions_in_the_sandbox_and_report_pass_at_1(tmp_path):
    task = load_task("humaneval")
    task.samples = task.samples[:6]
    solutions = {s.prompt: s.gold for s in task.samples}  # canonical solutions pass...
    broken = {task.samples[1].prompt, task.samples[4].prompt}  # ...these two get a wrong body, one a hostile one
    hostile = task.samples[5].prompt

    def answer(prompt):
        if prompt == hostile:
            return "    import os\n    while True: os.fork()\n"
        return "    return None\n" if prompt in broken else solutions[prompt]

    engine = ScriptedEngine(answer)
    result = evaluate(engine, [task], tmp_path, model="scripted", allow_code_execution=True, progress=False)
    assert result["tasks"]["humaneval"]["value"] == pytest.approx(3 / 6)
    records = {json.loads(l)["id"]: json.loads(l) for l in (tmp_path / "samples" / "humaneval.jsonl").read_text().splitlines()}
    assert [records[s.id]["outputs"][0]["passed"] for s in task.samples] == [True, False, True, True, False, False]
    assert records[task.samples[5].id]["outputs"][0]["status"] in ("failed", "timeout")
    assert all(sp.stop == task.stop and sp.max_new_tokens == 1024 and sp.temperature == 0 for _, sp in engine.asked)


def test_generation_tasks_score_each_completion(tmp_path):
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl",
                [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(8)])
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl",
                [{"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"},
                 {"question": "What is 3 + 3?", "answer": "3 + 3 = 6\n#### 6"}])
    task = load_task("gsm8k", tmp_path)
    engine = ScriptedEngine(lambda p: " 2 + 2 = 4\n#### 4" if p.endswith("What is 2 + 2?\nAnswer:") else " 7")
    result = evaluate(engine, [task], tmp_path / "out", model="scripted", progress=False)
    metrics = result["tasks"]["gsm8k"]["metrics"]
    assert metrics["exact_match_strict"] == 0.5 and result["tasks"]["gsm8k"]["metric"] == "maj@1"
    assert result["headline"]["gsm8k"] == {"maj@1": 0.5}
