"""lm-evaluation-harness model type `gemmalab`: lm-eval's numbers are our engine's, in-process and through the CLI.

Local task YAMLs over local JSONL files; nothing is fetched (HF_*_OFFLINE=1)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import gemmalab  # noqa: E402
from gemmalab.errors import GemmalabError  # noqa: E402
from gemmalab.evaluate.lm_eval import GemmalabLM  # noqa: E402  (the import registers --model gemmalab)
from gemmalab.evaluate.requests import generate_until, loglikelihoods  # noqa: E402
from gemmalab.inference import Engine  # noqa: E402

WORDS = "abc def ghi jkl mno pqr stu vwx yza bcd efg hij klm nop qrs tuv wxy zab".split()
CHOICE = [{"question": f"{WORDS[i]} {WORDS[i + 1]} {WORDS[i + 2]}",
           "choices": [WORDS[i + 3], f"{WORDS[i + 4]} {i}", "x"], "gold": i % 3} for i in range(6)]
GEN = [{"prompt": f"{WORDS[i]} {WORDS[i + 3]} {i}", "answer": WORDS[i]} for i in range(4)]
TEXT = [{"text": " ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(40))} for i in range(2)] + [{"text": "abc"}]
MAX_LENGTH = 32  # the rolling window, far shorter than the texts above
STOP = [" ", "\n"]
MAX_GEN = 10

TASKS = {
    "gl_choice": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
                  "doc_to_target": "{{gold}}", "metric_list": [{"metric": "acc"}]},
    "gl_gen": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
               "generation_kwargs": {"until": STOP, "max_gen_toks": MAX_GEN, "do_sample": False},
               "metric_list": [{"metric": "exact_match"}]},
    "gl_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                   "metric_list": [{"metric": "word_perplexity"}]},
}


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    model = gemmalab.Gemma(gemmalab.get_preset("tiny-gemma"))
    model.init_weights(std=0.3, seed=0)  # peaked outputs: no near-ties for greedy decoding to trip on
    return gemmalab.save_hf(model, tmp_path_factory.mktemp("tiny_model"), tokenizer=tiny_tokenizer)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """One YAML per task, each over its own JSONL, as `--include_path` takes them."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    for (name, spec), rows in zip(TASKS.items(), (CHOICE, GEN, TEXT)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                  "test_split": "test", **spec}
        (root / f"{name}.yaml").write_text(json.dumps(config))  # JSON is YAML
    return root


@pytest.fixture(scope="module")
def engine(model_dir):
    model, tokenizer = gemmalab.load(model_dir)
    return Engine(model, tokenizer, max_batch_size=1)


@pytest.fixture(scope="module")
def run(model_dir, task_dir):
    """One in-process lm-eval run of all three tasks."""
    return lm_eval.simple_evaluate(
        model="gemmalab", model_args=f"pretrained={model_dir},max_length={MAX_LENGTH}", tasks=list(TASKS),
        batch_size=1, log_samples=True, task_manager=TaskManager(include_path=str(task_dir)))


def choice_pairs(samples):
    return [tuple(a) for s in samples for a in s["arguments"]]


def test_multiple_choice_loglikelihoods_and_acc_are_ours(run, engine):
    samples = sorted(run["samples"]["gl_choice"], key=lambda s: s["doc_id"])
    pairs = choice_pairs(samples)
    assert pairs[:3] == [(CHOICE[0]["question"], " " + c) for c in CHOICE[0]["choices"]]  # lm-eval's " " delimiter
    ours = loglikelihoods(engine, pairs)
    theirs = [tuple(r[0]) for s in samples for r in s["resps"]]
    assert theirs == [(lp, greedy) for lp, greedy in ours]  # exactly
    n = len(CHOICE[0]["choices"])
    acc = [max(range(n), key=lambda k: ours[i * n + k][0]) == CHOICE[i]["gold"] for i in range(len(CHOICE))]
    assert run["results"]["gl_choice"]["acc,none"] == pytest.approx(sum(acc) / len(acc))


def test_generate_until_is_ours_with_stop_strings(run, engine):
    samples = sorted(run["samples"]["gl_gen"], key=lambda s: s["doc_id"])
    prompts = [s["arguments"][0][0] for s in samples]
    assert prompts == [g["prompt"] for g in GEN]
    assert all(len(engine.tokenizer.encode(p)) + MAX_GEN <= MAX_LENGTH for p in prompts)  # nothing truncated
    theirs = [s["resps"][0][0] for s in samples]
    assert theirs == generate_until(engine, prompts, tuple(STOP), MAX_GEN)
    assert not any(stop in t for t in theirs for stop in STOP)
    unstopped = generate_until(engine, prompts, (), MAX_GEN)
    assert theirs != unstopped  # the stop strings cut something


def reference_rolling(model, bos: int, ids: list[int], window: int) -> float:
    """Σ log p(token), each token predicted once by a plain forward pass over the `window` tokens before it
    (BOS first): lm-eval's rolling windows, written out independently."""
    seq, total, done = [bos, *ids], 0.0, 0
    while done < len(ids):
        end = done + min(window, len(ids) - done)
        inputs = seq[max(0, end - window):end]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inputs]))[0].float(), -1)
        n = end - done
        targets = torch.tensor(seq[done + 1:end + 1])
        total += float(logp[-n:].gather(-1, targets[:, None]).sum())
        done = end
    return total


def test_loglikelihood_rolling_windows_from_a_single_bos(run, engine):
    samples = sorted(run["samples"]["gl_rolling"], key=lambda s: s["doc_id"])
    tok = engine.tokenizer
    for sample, row in zip(samples, TEXT):
        ids = tok.encode(row["text"], bos=False)
        expected = reference_rolling(engine.model, tok.bos_id, ids, MAX_LENGTH)
        assert sample["resps"][0][0] == pytest.approx(expected, abs=1e-4)
    assert len(tok.encode(TEXT[0]["text"], bos=False)) > 2 * MAX_LENGTH  # several windows, the last one partial
    # One window: the plain forward pass of BOS + text.
    short = tok.encode(TEXT[2]["text"], bos=False)
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(torch.tensor([[tok.bos_id, *short]]))[0], -1)
    plain = float(logp[:-1].gather(-1, torch.tensor(short)[:, None]).sum())
    assert samples[2]["resps"][0][0] == pytest.approx(plain, abs=1e-4)


def test_cli_writes_results(model_dir, task_dir, tmp_path, run):
    """lm-eval's own CLI (`gemmalab-lm-eval` = lm_eval.__main__.cli_evaluate after registration), batch size 4."""
    script = Path(sys.executable).with_name("gemmalab-lm-eval")
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [str(script), "--model", "gemmalab", "--model_args", f"pretrained={model_dir}", "--tasks", "gl_choice",
         "--include_path", str(task_dir), "--batch_size", "4", "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["results"]["gl_choice"]["acc,none"] == run["results"]["gl_choice"]["acc,none"]
    assert results["config"]["batch_size"] in (4, "4")
    # Batch size 4 scores exactly as batch size 1 did: the engine scores each pair alone.
    logged = [json.loads(line) for line in next(out.rglob("samples_gl_choice_*.jsonl")).read_text().splitlines()]
    cli = [float(r[0][0]) for s in sorted(logged, key=lambda s: s["doc_id"]) for r in s["resps"]]
    in_process = [r[0][0] for s in sorted(run["samples"]["gl_choice"], key=lambda s: s["doc_id"]) for r in s["resps"]]
    assert cli == in_process


def test_model_args(model_dir):
    lm = GemmalabLM.create_from_arg_string(f"pretrained={model_dir},batch_size=3", {"batch_size": 1, "device": None})
    assert lm.batch_size == lm.engine.max_batch_size == 3  # model_args win over the CLI's default --batch_size
    assert lm.max_length == 255  # tiny-gemma has 256 positions; the scored token needs the last one
    with pytest.raises(GemmalabError, match="Unknown model_args"):
        GemmalabLM(pretrained=str(model_dir), temperature=1)
    with pytest.raises(GemmalabError, match="BOS"):
        GemmalabLM(pretrained=str(model_dir), add_bos_token=False)
    with pytest.raises(GemmalabError, match="max_length"):
        GemmalabLM(pretrained=str(model_dir), max_length=256)
    with pytest.raises(GemmalabError, match="not supported"):
        lm._generation_settings({"until": ["\n"], "top_p": 0.5}, 0)
    assert lm._generation_settings({"until": "x", "do_sample": True, "top_p": 1.0}, 0) == (("x",), 256, 1.0, None)
    assert lm._generation_settings({"temperature": 0.7, "do_sample": False}, 0) == ((), 256, 0.0, None)
    bos = lm.tokenizer.bos_id  # over-long inputs lose their oldest tokens, never BOS
    assert lm._fit(([bos, *range(10, 300)], [5, 6]), 0) == ([bos, *range(300 - 253, 300)], [5, 6])  # 1 + 253 + 2 = 256
    long_prompt = " ".join(WORDS * 200)
    ids = lm.tokenizer.encode(long_prompt)
    assert lm._prompt(long_prompt, 48) == [bos, *ids[-(lm.max_length - 48 - 1):]]
    chat = lm.apply_chat_template([{"role": "user", "content": "abc"}])  # --apply_chat_template
    assert chat == "<bos><start_of_turn>user\nabc<end_of_turn>\n<start_of_turn>model\n"
    assert lm.tokenizer.encode(chat).count(bos) == 1
    # lm-eval's CLI always passes --device (cuda:0 by default); without CUDA that means the CPU, as for its HF model
    lm = GemmalabLM.create_from_arg_obj({"pretrained": str(model_dir)}, {"device": "cuda:0"})
    assert lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
