"""Our log-likelihoods equal lm-eval's own `hf` model (HFLM: lm-eval loads transformers' Gemma3ForCausalLM and
AutoTokenizer from a transformers folder we wrote) on the same requests: the rows of our MMLU and multiple-choice
task definitions, as our harness builds them, and edge rows for lm-eval's encoding rules.

How HFLM encodes a request (lm-eval 0.4.13, `TemplateLM.loglikelihood` and `_encode_pair`): an empty context is
[BOS] and the continuation is encoded without special tokens; otherwise all trailing whitespace of the context moves
to the continuation, context + continuation is encoded whole (the tokenizer adds BOS, Gemma's add_bos_token, unless
the text starts with "<bos>"), and the continuation is the whole's ids after len(context's own encoding). It scores
ids[:-1] right-padded in batches, log_softmax in fp32, one forward per context for one-token continuations.

Tolerance: 1e-4 absolute per log-likelihood in fp32. The two sides run the same weights through different kernels
(transformers' SDPA attention and padded batches against our engine's exact one-pair forwards), which differ by fp32
rounding: about 1e-7 relative per operation, under 1e-5 on these sums (|log p| < 200). A real scoring difference
(a lost or doubled BOS, a token moved across the boundary) changes a log-likelihood by far more than 1e-4.
"""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

import gemmalab  # noqa: E402
from gemmalab.evaluate import evaluate, load_task  # noqa: E402
from gemmalab.evaluate.harness import choice_pairs  # noqa: E402
from gemmalab.evaluate.lm_eval import GemmalabLM  # noqa: E402
from gemmalab.evaluate.requests import encode_pair, generate_until, loglikelihoods  # noqa: E402
from gemmalab.evaluate.tasks.mmlu import load_mmlu  # noqa: E402
from gemmalab.inference import Engine  # noqa: E402

TOLERANCE = 1e-4
VOCAB = "ab cd efg hij klmn op qrs tuv wxyz bac dce fge".split()
SUBJECTS = ("anatomy", "astronomy")
# Our own task definition whose contexts end in a newline and whose choices follow with no delimiter: lm-eval moves
# every trailing whitespace character to the continuation, not only spaces.
NEWLINE_TASK = """data = "nl.jsonl"
doc_to_text = "{{question}}\\n"
doc_to_choice = "{{choices}}"
doc_to_target = "{{gold}}"
target_delimiter = ""
"""


def phrase(i: int, n: int = 3) -> str:
    return " ".join(VOCAB[(i * 7 + k * 3) % len(VOCAB)] for k in range(n))


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_data(root: Path) -> Path:
    """Local rows for mmlu (per-subject JSONL, 5 dev shots), arc_easy, winogrande (partial scoring) and NEWLINE_TASK."""
    for k, s in enumerate(SUBJECTS):
        for split, n in (("dev", 5), ("test", 3)):
            write_rows(root / "mmlu" / s / f"{split}.jsonl", [
                {"question": f" {phrase(i + k)} {split}? ", "subject": s, "answer": (i + k) % 4,
                 "choices": [phrase(i, 1), phrase(i + 1, 2), f"{phrase(i + 2, 1)} {i}", "none"]} for i in range(n)])
    write_rows(root / "arc_easy" / "test.jsonl", [
        {"question": phrase(i, 4), "answerKey": "ABC"[i % 3],
         "choices": {"text": [phrase(i + 1, 1), phrase(i + 2, 2), phrase(i + 3, 3)], "label": ["A", "B", "C"]}}
        for i in range(4)])
    write_rows(root / "winogrande" / "validation.jsonl", [
        {"sentence": f"{phrase(i, 2)} since _ {phrase(i + 1, 2)}.", "option1": phrase(i + 2, 1),
         "option2": phrase(i + 3, 1), "answer": "12"[i % 2]} for i in range(3)])
    write_rows(root / "nl.jsonl", [{"question": phrase(i, 3), "choices": [phrase(i + 4, 1), f" {phrase(i + 5, 1)}"],
                                    "gold": i % 2} for i in range(3)])
    (root / "newline_task.toml").write_text(NEWLINE_TASK)
    return root


def requests(pairs: list[tuple[str, str]]) -> list[Instance]:
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def hflm_ids(lm: HFLM, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The ids HFLM scores for a pair (its empty-context branch, else its own _encode_pair)."""
    if not context:
        return [lm.prefix_token_id], lm.tok_encode(continuation, add_special_tokens=False)
    return lm._encode_pair(context, continuation)


def assert_same_scores(hf: HFLM, tokenizer, pairs: list[tuple[str, str]],
                       ours: list[tuple[float, bool]]) -> list[tuple[float, bool]]:
    """Same ids on both sides, log-likelihoods within TOLERANCE, the same is_greedy; returns HFLM's scores."""
    for ctx, cont in pairs:
        assert hflm_ids(hf, ctx, cont) == encode_pair(tokenizer, ctx, cont), (ctx, cont)
    theirs = hf.loglikelihood(requests(pairs), disable_tqdm=True)
    diffs = [abs(a[0] - b[0]) for a, b in zip(theirs, ours, strict=True)]
    worst = max(range(len(diffs)), key=diffs.__getitem__)
    assert diffs[worst] <= TOLERANCE, f"|log-likelihood difference| {diffs[worst]:.2e} at {pairs[worst]}"
    assert [g for _, g in theirs] == [g for _, g in ours]
    return theirs


@pytest.fixture(scope="module")
def setup(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    torch.manual_seed(0)
    model = gemmalab.Gemma(replace(gemmalab.get_preset("tiny-gemma3"), max_seq_len=1024))  # room for 5 MMLU shots
    model.init_weights(std=0.3, seed=0)  # peaked outputs: no near-ties for is_greedy to trip on
    folder = str(gemmalab.save_hf(model, root / "model", tokenizer=tiny_tokenizer))
    hf = HFLM(pretrained=folder, dtype="float32", device="cpu", batch_size=4)
    assert type(hf.model).__name__ == "Gemma3ForCausalLM"  # transformers' model, not our engine
    return GemmalabLM(pretrained=folder, batch_size=4), hf, write_data(root / "data"), root


@pytest.mark.parametrize("name", ["mmlu", "arc_easy", "winogrande", "newline_task.toml"])
def test_task_rows_score_and_accuracy_equal_hflm(setup, name):
    ours, hf, data, root = setup
    task = load_task(str(data / name) if name.endswith(".toml") else name, data)
    result = evaluate(ours.engine, [task], root / "ours" / name, progress=False)
    records = [json.loads(line) for line in (root / "ours" / name / "samples" / f"{task.name}.jsonl").open()]
    per_sample = [choice_pairs(task, s) for s in task.samples]
    pairs = [p for ps in per_sample for p in ps]
    adapter = ours.loglikelihood(requests(pairs), disable_tqdm=True)  # what `--model gemmalab` answers
    theirs = iter(assert_same_scores(hf, ours.tokenizer, pairs, adapter))
    hits = 0
    for rec, ps in zip(records, per_sample, strict=True):
        lls = [next(theirs)[0] for _ in ps]
        assert rec["loglikelihoods"] == pytest.approx(lls, abs=TOLERANCE)
        pred = max(range(len(lls)), key=lls.__getitem__)  # lm-eval's acc: argmax of the log-likelihoods
        assert rec["pred"] == pred
        hits += pred == rec["gold"]
    assert result["tasks"][task.name]["metrics"]["acc"] == pytest.approx(hits / len(records))


def test_edge_rows_score_equal_hflm(setup):
    ours, hf, _, _ = setup
    tok = ours.tokenizer
    # A split inside a word where a token of the whole spans the boundary: lm-eval keeps the whole's later ids.
    # One per sentence: HFLM's logits cache mis-scores requests whose ids are the same but split elsewhere (it
    # gathers the first, not the last, positions of the group's logits), a case no real task produces.
    spanning = [next(((s[:k], s[k:]) for k in range(1, len(s)) if " " not in s[k - 1:k + 1]
                      and tok.encode(s)[:len(tok.encode(s[:k]))] != tok.encode(s[:k])), None)
                for s in (f"{phrase(i, 4)} {phrase(i + 1, 4)}" for i in range(4))]
    assert all(spanning)
    chat = tok.render_chat([{"role": "user", "content": phrase(5)}], True)  # starts with "<bos>": no second BOS
    contexts = [phrase(3, 2), phrase(5), f"{phrase(4)}\nAnswer:", chat]
    greedy = generate_until(ours.engine, contexts, max_new_tokens=2)  # continuations that greedy decoding gives
    assert all(greedy)
    pairs = [("", phrase(6)), ("  ", phrase(7)), (f"{phrase(8)}\n", phrase(9, 1)), (f"{phrase(10)}\t", " x"),
             (f"{phrase(11)}\n\n", "Q"), (f"{phrase(12)}   ", phrase(13, 1)), *spanning,
             *zip(contexts, greedy), *((c, " " + phrase(14, 2)) for c in contexts)]
    scores = ours.loglikelihood(requests(pairs), disable_tqdm=True)
    assert any(g for _, g in scores) and not all(g for _, g in scores)  # is_greedy is checked both ways
    assert_same_scores(hf, tok, pairs, scores)
    assert scores == loglikelihoods(ours.engine, pairs)  # our harness and the adapter: the same numbers


@pytest.mark.real_model
def test_real_model_mmlu_rows_score_equal_hflm(real_model, hf_gguf_model, hf_gguf_tokenizer, tmp_path):
    """Gemma 3 270M: HFLM over transformers' own GGUF loading (model and tokenizer) against our GGUF loading.
    0-shot, two questions: each request is a forward of the 270M model (262k-token vocabulary) on our side."""
    model, tokenizer = real_model
    write_rows(tmp_path / "miscellaneous" / "dev.jsonl", [])  # the reader wants the shots' file, even for 0 shots
    write_rows(tmp_path / "miscellaneous" / "test.jsonl", [
        {"question": "How many legs does a spider have?", "choices": ["Six", "Eight", "Ten", "Four"], "answer": 1},
        {"question": "Which planet is closest to the Sun?", "choices": ["Venus", "Earth", "Mercury", "Mars"],
         "answer": 2}])
    task = load_mmlu(tmp_path, num_fewshot=0)
    pairs = [p for s in task.samples for p in choice_pairs(task, s)]
    hf = HFLM(pretrained=hf_gguf_model, tokenizer=hf_gguf_tokenizer, batch_size=4, max_length=2048)
    assert_same_scores(hf, tokenizer, pairs, loglikelihoods(Engine(model, tokenizer), pairs))
