"""The reward model: the Bradley-Terry loss and its gradients by hand, the head read at the last real token under
either padding, preference formats and what is dropped, the built-in pairs, and the stage (held-out accuracy, the
saved head, `reward score`, exact resume after kill -9)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import kill_9_and_resume

from gemmalab.config import load
from gemmalab.data.instruct import is_correct
from gemmalab.data.preferences import (BuiltinPreferences, Preference, builtin_preferences, read_preferences,
                                       render_pair, scored_ids)
from gemmalab.errors import GemmalabError
from gemmalab.model import Gemma, get_preset
from gemmalab.model.heads import add_head, last_real_index, load_scored, save_head, sequence_scores
from gemmalab.train.reward import RewardConfig, bt_loss, reward, score

ROOT = Path(__file__).resolve().parents[1]


def test_bradley_terry_loss_and_gradients_by_hand():
    rc = torch.tensor([1.0], requires_grad=True)
    rr = torch.tensor([0.0], requires_grad=True)
    loss = bt_loss(rc, rr, torch.tensor([0.5]))
    assert float(loss.detach()) == pytest.approx(math.log(1 + math.exp(-0.5)))  # -log sigmoid(1 - 0 - 0.5)
    loss.backward()
    sig = 1 / (1 + math.exp(0.5))  # sigmoid(-0.5)
    assert float(rc.grad) == pytest.approx(-sig) and float(rr.grad) == pytest.approx(sig)
    rc.grad = rr.grad = None
    lam = 0.01
    bt_loss(rc, rr, None, center_coef=lam).backward()  # + lam (rc + rr)^2: gradient 2 lam (rc + rr) on both
    plain = 1 / (1 + math.exp(1.0))
    assert float(rc.grad) == pytest.approx(-plain + 2 * lam) and float(rr.grad) == pytest.approx(plain + 2 * lam)
    two = bt_loss(torch.tensor([2.0, -1.0]), torch.tensor([0.0, 1.0]))  # summed over pairs (the loop takes the mean)
    assert float(two) == pytest.approx(math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(2.0)))


def test_the_head_is_read_at_the_last_real_token_under_left_and_right_padding():
    model = Gemma(get_preset("tiny-gemma"))
    model.init_weights(seed=0)
    add_head(model, seed=1)
    model.eval()
    rows = [[2, 10, 11, 12, 13, 14], [2, 20, 21], [2, 30, 31, 32, 33]]
    alone = torch.stack([sequence_scores(model, torch.tensor([r]))[0] for r in rows])
    T = max(map(len, rows))
    right = torch.zeros(3, T, dtype=torch.long)
    left = torch.zeros(3, T, dtype=torch.long)
    rmask, lmask = torch.zeros(3, T, dtype=torch.bool), torch.zeros(3, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        right[b, :len(r)], rmask[b, :len(r)] = torch.tensor(r), True
        left[b, T - len(r):], lmask[b, T - len(r):] = torch.tensor(r), True
    assert last_real_index(rmask).tolist() == [5, 2, 4] and last_real_index(lmask).tolist() == [5, 5, 5]
    torch.testing.assert_close(sequence_scores(model, right, rmask), alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sequence_scores(model, left, lmask), alone, atol=1e-5, rtol=1e-5)
    # the pitfall: reading the last column under right padding scores padding, not the answer
    h = model(right, attention_mask=rmask, return_hidden=True)
    naive = model.reward_head(h[:, -1]).squeeze(-1)
    assert not torch.allclose(naive[1:], alone[1:], atol=1e-3)
    with pytest.raises(GemmalabError, match="no real token"):
        last_real_index(torch.zeros(1, 3, dtype=torch.bool))


def test_preference_formats_and_what_is_dropped(tiny_tokenizer, tmp_path):
    path = tmp_path / "prefs.jsonl"
    good = {"prompt": "Name a colour.", "chosen": "Blue", "rejected": "Seven", "margin": 1}
    hh = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
          "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]}
    lines = [good, hh, {"prompt": "p", "chosen": "a"},
             {"chosen": [{"role": "user", "content": "A"}, {"role": "model", "content": "x"}],
              "rejected": [{"role": "user", "content": "B"}, {"role": "model", "content": "y"}]},
             {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}, {"prompt": "p", "chosen": "a", "rejected": "a"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n[1]\n")
    got = list(read_preferences(path))
    assert len(got) == 7
    prefs = [p for _, p, _ in got if p is not None]
    problems = [q for _, p, q in got if p is None]
    assert prefs[0].margin == 1.0 and prefs[1].prompt == [{"role": "user", "content": "Hi"}]
    assert prefs[1].chosen == "Hello!" and prefs[1].rejected == "Go away."
    assert any('line 3: missing "rejected"' in q for q in problems)
    assert any("line 4:" in q and "share every message" in q for q in problems)
    assert any('line 5: "margin" must be a number' in q for q in problems)
    assert any("line 7:" in q for q in problems) and len(problems) == 4
    assert render_pair(tiny_tokenizer, prefs[2], 64) == "identical"
    ids = scored_ids(tiny_tokenizer, prefs[0].prompt, prefs[0].chosen)
    assert ids[-1] == tiny_tokenizer.end_of_turn_id and ids.count(tiny_tokenizer.bos_id) == 1
    prompt_len = len(tiny_tokenizer.apply_chat_template(prefs[0].prompt))
    long = Preference(prefs[0].prompt, "same start " * 20 + "one", "same start " * 20 + "two")
    assert render_pair(tiny_tokenizer, long, prompt_len + 4) == "identical_after_truncation"
    assert isinstance(render_pair(tiny_tokenizer, long, 400), tuple)
    assert render_pair(tiny_tokenizer, long, prompt_len) == "prompt_too_long"


def test_builtin_pairs_are_disjoint_wrong_and_of_every_kind():
    train, heldout = builtin_preferences(BuiltinPreferences(train=300, heldout=60, seed=3))
    assert len(train) == 300 and len(heldout) == 60
    assert not {p.prompt[0]["content"] for p in train} & {p.prompt[0]["content"] for p in heldout}
    assert all(p.rejected != p.chosen and not is_correct(p.rejected, p.chosen) for p in train + heldout)
    assert {p.kind for p in train} == {"wrong", "truncated", "badly_formatted"}
    # the held-out pairs depend on neither the number of training pairs nor anything but the seed
    again = builtin_preferences(BuiltinPreferences(train=10, heldout=60, seed=3))[1]
    assert [(p.chosen, p.rejected) for p in again] == [(p.chosen, p.rejected) for p in heldout]
    with pytest.raises(GemmalabError, match="kinds"):
        BuiltinPreferences(kinds=["rude"])


def test_sampled_pairs_take_the_models_own_wrong_answers():
    """Kind "sampled": the first wrong answer in `sample_attempts` tries; right or empty tries are retried, and a
    prompt the model always gets right falls back to a made-up wrong answer."""
    calls = []

    def sample(prompts, attempt):
        calls.append((len(prompts), attempt))
        out = []
        for p in prompts:
            text = p[-1]["content"]
            if "greater" in text:  # always right: "yes"/"no" as the check wants
                a, b = map(int, re.findall(r"\d+", text))
                out.append("yes" if a > b else "no")
            else:  # brackets: empty first, then a wrong word
                out.append("" if attempt == 0 else "[nothing]")
        return out

    cfg = BuiltinPreferences(train=40, heldout=10, tasks=["greater", "brackets"], kinds=["sampled"], sample_attempts=3)
    train, heldout = builtin_preferences(cfg, sample)
    for p in train + heldout:
        assert not is_correct(p.rejected, p.chosen)
        if p.prompt[0]["content"].startswith("Put the word"):
            assert (p.kind, p.rejected) == ("sampled", "[nothing]")
        else:
            assert p.kind == "wrong"  # every try was right
    assert [a for _, a in calls] == [0, 1, 2, 0, 1, 2]  # train, then held-out; greater prompts retried to the end
    with pytest.raises(GemmalabError, match="need a model"):
        builtin_preferences(cfg)


# ---- the stage --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def start_model(tiny_tokenizer, tmp_path_factory):
    from gemmalab.checkpoint import save_hf

    model = Gemma(get_preset("tiny-gemma"))
    model.init_weights(std=0.02, seed=5)
    return save_hf(model, tmp_path_factory.mktemp("reward_start") / "model", tiny_tokenizer)


def _config(tmp_path: Path, start_model: Path, *extra: str) -> Path:
    path = tmp_path / "reward.toml"
    path.write_text(f"""
[model]
init_from = "{start_model}"

[data]
batch_size = 8
seq_len = 64

[data.builtin]
train = 400
heldout = 40
tasks = ["greater", "brackets"]
kinds = ["badly_formatted", "truncated"]

[optim]
lr = 3e-3
warmup_steps = 2

[train]
steps = 6
log_every = 1
seed = 1

[checkpoint]
every = 3
keep = 1
""" + "\n".join(extra))
    return path


def _losses(run: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["accuracy"], r["margin"]) for r in
            map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_the_stage_learns_saves_its_head_and_scores(start_model, tiny_tokenizer, tmp_path):
    cfg = load(RewardConfig, _config(tmp_path, start_model), ["train.steps=60"])
    result = reward(cfg, tmp_path / "run", progress=False)
    assert result["status"] == "finished" and result["reconciled"]
    assert result["pairs_read"] == 440 and result["pairs_trained"] == 400 and result["heldout_pairs"] == 40
    assert result["heldout_accuracy"] >= 0.9 > result["heldout_accuracy_before"], result
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["stage"] == "reward" and saved["heldout_accuracy"] == result["heldout_accuracy"]
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "reward_head.safetensors").is_file()
    model, tok = load_scored(tmp_path / "run")  # a run directory works too
    records = [json.loads(x) for x in (tmp_path / "run" / "heldout_after.jsonl").read_text().splitlines()][:-1]
    from gemmalab.train.reward import _pairs

    _, heldout, _ = _pairs(cfg, tok)
    from gemmalab.train.reward import pair_scores

    again = pair_scores(model, heldout, tok.pad_id, batch_size=7)  # the saved model scores as the trained one did
    assert [c for c, _ in again] == pytest.approx([r["chosen"] for r in records], abs=1e-4)
    items = [(p.prompt, "[apple]") for p in builtin_preferences(cfg.data.builtin)[1][:5]]
    assert score(model, tok, items, batch_size=2) == pytest.approx(score(model, tok, items, batch_size=5), abs=1e-5)

    # `gemmalab reward score`, and a bad line named
    from gemmalab.cli import main

    inp, out = tmp_path / "answers.jsonl", tmp_path / "scored.jsonl"
    inp.write_text(json.dumps({"prompt": "Put the word apple in square brackets.", "response": "[apple]"}) + "\n" +
                   json.dumps({"messages": [{"role": "user", "content": "Put the word apple in square brackets."},
                                            {"role": "model", "content": "Sure! [apple]"}]}) + "\n")
    assert main(["reward", "score", "--model", str(model_dir), "--input", str(inp), "--output", str(out)]) == 0
    scored = [json.loads(x) for x in out.read_text().splitlines()]
    assert scored[0]["response"] == "[apple]" and scored[0]["reward"] > scored[1]["reward"]  # the chatter loses
    inp.write_text('{"prompt": "x"}\n')
    assert main(["reward", "score", "--model", str(model_dir), "--input", str(inp)]) == 2


def test_reward_resumes_exactly_after_kill_9(start_model, tmp_path):
    """With pairs of every kind, "sampled" included: the model's own answers are drawn again on resume, the same."""
    config = _config(tmp_path, start_model)
    config.write_text(config.read_text().replace('kinds = ["badly_formatted", "truncated"]',
                                                 'kinds = ["badly_formatted", "truncated", "sampled"]\nsample_tokens = 6'))
    threads = torch.get_num_threads()
    try:
        reference = reward(load(RewardConfig, config, ["train.threads=1"]), tmp_path / "ref", progress=False)
    finally:
        torch.set_num_threads(threads)
    assert reference["heldout_accuracy_by_kind"]["before"].get("sampled") is not None
    run = tmp_path / "run"
    done = kill_9_and_resume(["reward", "--config", str(config), "--out", str(run), "train.threads=1"], run, 4, ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _losses(run) == _losses(tmp_path / "ref")
    assert (run / "heldout_before.jsonl").read_text() == (tmp_path / "ref" / "heldout_before.jsonl").read_text()
    resumed = json.loads((run / "result.json").read_text())
    assert (resumed["heldout_accuracy_before"], resumed["heldout_accuracy"]) == (
        reference["heldout_accuracy_before"], reference["heldout_accuracy"])


def test_config_errors(start_model):
    with pytest.raises(GemmalabError, match="no preference pairs"):
        load(RewardConfig, None, ["data.builtin=false"])
    shipped = load(RewardConfig, ROOT / "configs" / "reward" / "tiny.toml", [f'model.init_from="{start_model}"'])
    assert shipped.data.builtin is not None and shipped.model.init_from == str(start_model)
    with pytest.raises(GemmalabError, match="reward model"):
        load_scored(start_model)  # a plain model directory has no head
    with pytest.raises(GemmalabError, match="weight"):
        save_head({"weight": torch.zeros(1, 2)}, start_model.parent / "x")
