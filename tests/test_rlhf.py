"""RLHF: the arithmetic against hand-computed cases (KL estimators, RLOO, PPO, GAE, the adaptive controller), the
hacking guard's rule, and the stage on tiny models (RLOO and PPO steps, exact resume after kill -9)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import kill_9_and_resume

from gemmalab.config import load
from gemmalab.errors import GemmalabError
from gemmalab.evaluate.judges import Pairing, ReferenceJudge
from gemmalab.train import rl
from gemmalab.train.rlhf import GuardSection, GuardState, RLHFConfig, rlhf

ROOT = Path(__file__).resolve().parents[1]


# ---- the arithmetic ---------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_estimators_average_to_the_exact_kl(estimator):
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=gen), 0)
    q = torch.softmax(torch.randn(6, generator=gen), 0)
    exact = float((p * (p / q).log()).sum())
    tokens = torch.arange(6)
    per_token = rl.kl_per_token(p.log()[tokens], q.log()[tokens], estimator)
    assert float((p * per_token).sum()) == pytest.approx(exact, rel=1e-5)  # E_p[k] over every token, weighted by p
    samples = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    mc = float(rl.kl_per_token(p.log()[samples], q.log()[samples], estimator).mean())
    assert mc == pytest.approx(exact, rel=0.05)
    if estimator == "k3":
        assert bool((per_token >= 0).all())
    else:
        assert bool((per_token < 0).any())  # k1 is signed: why k3 is what the KL ceiling watches
    with pytest.raises(GemmalabError, match="k1, k3"):
        rl.kl_per_token(p, q, "k2")


def test_rloo_advantages_and_clipped_loss_by_hand():
    adv = rl.rloo_advantages(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]]))
    # baselines: the others' mean: (2+3)/2, (1+3)/2, (1+2)/2 and 2, 2, 0
    assert adv.tolist() == [[-1.5, 0.0, 1.5], [-2.0, -2.0, 4.0]]
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.5, 1.0, 0.9]))  # ratios 1.5 (clipped to 1.2), 1, 0.9
    a = torch.tensor([2.0, 1.0, -1.0])
    loss, clipped = rl.rloo_loss(new, old, a, clip=0.2)
    # max(-A r, -A clip(r)): -2*1.2 = -2.4 (clipped), -1, max(0.9, 0.9) = 0.9
    assert float(loss) == pytest.approx(-2.4 - 1.0 + 0.9)
    assert int(clipped) == 1
    with pytest.raises(GemmalabError, match="at least 2"):
        rl.rloo_advantages(torch.ones(2, 1))


def test_gae_by_hand_with_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = rl.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: deltas 0.1, 0.1, 0.3; A2 = 0.3, A1 = 0.1 + 0.5 * 0.3, A0 = 0.1 + 0.5 * 0.25
    assert adv[0].tolist() == pytest.approx([0.225, 0.25, 0.3])
    # row 1 ends at t = 1 (V after it is 0): delta1 = 2 - 0.4, delta0 = 0.5 + 0.4 - 0.2
    assert adv[1].tolist() == pytest.approx([0.7 + 0.5 * 1.6, 1.6, 0.0])
    torch.testing.assert_close(ret, adv + values * mask)
    adv_g, _ = rl.gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert float(adv_g[0, 0]) == pytest.approx(0.9 * 0.9 * 1.0 - 0.5)  # lam 1: discounted return minus V


def test_ppo_losses_by_hand():
    logp_old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.3, 0.7, 1.0]]))
    adv = torch.tensor([[1.0, -1.0, 5.0]])
    mask = torch.tensor([[True, True, False]])
    loss, clipped = rl.ppo_policy_loss(logp, logp_old, adv, mask, clip=0.2)
    # token 0: max(-1.3, -1.2) = -1.2; token 1: max(0.7, 0.8) = 0.8; token 2 masked
    assert float(loss) == pytest.approx(-1.2 + 0.8)
    assert int(clipped) == 2
    values, old_values, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[2.0, 0.3]])
    vf = rl.ppo_value_loss(values, old_values, returns, torch.tensor([[True, True]]), clip=0.2)
    # token 0: max((1-2)^2, (0.7-2)^2) / 2 = 0.845; token 1: 0.09 / 2
    assert float(vf) == pytest.approx(0.845 + 0.045)


def test_adaptive_kl_and_whitening():
    c = rl.AdaptiveKL(beta=0.1, target=1.0, horizon=1000)
    assert c.update(kl=5.0, n=100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # the error is clipped at 0.2
    assert c.update(kl=0.9, n=100) == pytest.approx(0.102 * (1 - 0.1 * 0.1))
    assert rl.AdaptiveKL(beta=0.1).update(kl=100.0) == 0.1  # no target: fixed
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    w = rl.whiten(x, torch.tensor([True, True, True, False]))
    assert w[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-5) and float(w[3]) == 0.0
    assert rl.whiten(x[:3], shift_mean=False).tolist() == pytest.approx([1.0, 2.0, 3.0], abs=1e-5)


def test_guard_flags_a_rising_reward_with_a_falling_win_rate():
    cfg = GuardSection(win_drop=0.05)
    g = GuardState(best_score=1.0)  # the SFT model's answers score 1.0
    first = g.check(10, 0.6, 1.1, cfg)  # better than the SFT model: the new best
    assert first["best"] and not first["flagged"] and (g.best_step, g.best_score) == (10, 1.1)
    both_fell = g.check(20, 0.4, 0.5, cfg)  # the score fell too: a bad patch, not hacking
    assert not both_fell["flagged"] and not both_fell["best"]
    within = g.check(25, 0.56, 2.0, cfg)  # the win rate within win_drop of the best
    assert not within["flagged"]
    hacked = g.check(30, 0.5, 3.0, cfg)
    assert hacked["flagged"] and g.best_step == 10 and [c["step"] for c in g.checks] == [10, 20, 25, 30]
    judge = ReferenceJudge(exact=True)
    [v] = judge.judge([Pairing("q", "7 7 7 7", "7", "7")])
    assert v.choice == "B"  # the exact judge is not fooled by padding; the containment judge ties them
    assert ReferenceJudge().judge([Pairing("q", "7 7 7 7", "7", "7")])[0].choice == "tie"


# ---- the stage --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_model(tiny_tokenizer, tmp_path_factory):
    """A tiny model briefly instruction-tuned on two built-in tasks: it ends its turns and answers some right (about
    a fifth: yes/no and one of two numbers), so a judge can see it get worse."""
    from gemmalab.checkpoint import save_hf
    from gemmalab.model import Gemma, get_preset
    from gemmalab.train.sft import SFTConfig, sft

    root = tmp_path_factory.mktemp("rlhf_sft")
    model = Gemma(get_preset("tiny-gemma"))
    model.init_weights(std=0.02, seed=3)
    start = save_hf(model, root / "start", tiny_tokenizer)
    cfg = load(SFTConfig, None, [f'model.init_from="{start}"', "data.builtin.train=600", "data.builtin.heldout=16",
                                 'data.builtin.tasks=["greater", "larger"]', "data.filters.near_dedup=false",
                                 "data.batch_size=8", "data.seq_len=96", "optim.lr=3e-3", "optim.warmup_steps=5",
                                 "train.steps=40", "checkpoint.every=0", "heldout.max_new_tokens=12"])
    sft(cfg, root / "sft", progress=False)
    return root / "sft" / "model"


@pytest.fixture(scope="module")
def reward_model(sft_model, tmp_path_factory):
    """A reward model directory (random head on the SFT trunk): what `[reward] model` loads."""
    import shutil

    from gemmalab.model.heads import save_head

    directory = tmp_path_factory.mktemp("rlhf_rm") / "model"
    shutil.copytree(sft_model, directory)
    gen = torch.Generator().manual_seed(0)
    dim = json.loads((directory / "config.json").read_text())["hidden_size"]
    save_head({"weight": torch.randn(1, dim, generator=gen) * 0.1, "bias": torch.zeros(1)}, directory)
    return directory


def _config(tmp_path: Path, sft_model: Path, reward_model: Path, *extra: str) -> Path:
    path = tmp_path / "rlhf.toml"
    path.write_text(f"""
[model]
init_from = "{sft_model}"

[reward]
model = "{reward_model}"

[data]
seq_len = 96
batch_size = 32

[data.builtin]
train = 600
heldout = 16
tasks = ["greater", "larger"]

[rlhf]
prompts_per_step = 4
samples_per_prompt = 2
max_new_tokens = 12
minibatch_size = 4

[guard]
judge_every = 2
judge_prompts = 8
win_drop = 1.0  # a random reward model: these runs are about the steps, not the guard

[optim]
lr = 1e-4
warmup_steps = 0

[train]
steps = 4
seed = 1

[checkpoint]
every = 2
keep = 1

[heldout]
max_new_tokens = 12
""" + "\n".join(extra))
    return path


def _metrics(run: Path) -> list[dict]:
    skip = {"rollout_s", "score_s", "update_s", "step_time_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in skip}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["rloo", "ppo"])
def test_rlhf_steps_write_every_figure(algorithm, sft_model, reward_model, tmp_path):
    cfg = load(RLHFConfig, _config(tmp_path, sft_model, reward_model), [f'rlhf.algorithm="{algorithm}"',
                                                                         "rlhf.samples_per_prompt=2"])
    result = rlhf(cfg, tmp_path / "run", progress=False)
    assert result["status"] == "finished" and result["steps"] == 4 and result["stopped_by_guard"] is None
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "kl", "reward_before", "reward_after", "judge_win_rate",
                "stopped_by_guard"):
        assert key in saved
    assert 0 <= saved["accuracy_before"] <= 1 and saved["heldout"] == 16
    rows = _metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward", "rm_score", "kl", "kl_k1", "kl_k3", "entropy", "length", "ended_turn", "clip_frac", "beta"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["kl_k1"] == pytest.approx(0.0, abs=1e-5)  # the first samples come from the SFT weights
    assert [r.get("judge_win_rate") is not None for r in rows] == [False, True, False, True]
    if algorithm == "ppo":
        assert all("value_loss" in r for r in rows)
    import gemmalab

    model, _ = gemmalab.load(tmp_path / "run" / "model")  # a plain model directory (no value head)
    assert not hasattr(model, "value_head")
    with pytest.raises(GemmalabError, match="already has checkpoints"):
        rlhf(cfg, tmp_path / "run", progress=False)


def test_rlhf_resumes_exactly_after_kill_9(sft_model, reward_model, tmp_path):
    config = _config(tmp_path, sft_model, reward_model)
    threads = torch.get_num_threads()
    try:
        reference = rlhf(load(RLHFConfig, config, ["train.threads=1"]), tmp_path / "ref", progress=False)
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "run"
    done = kill_9_and_resume(["rlhf", "--config", str(config), "--out", str(run), "train.threads=1"], run, 3, ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _metrics(run) == _metrics(tmp_path / "ref")  # steps 1-4: samples, rewards, KL and losses bit for bit
    resumed = json.loads((run / "result.json").read_text())
    for key in ("accuracy_before", "accuracy_after", "reward_after", "kl", "judge_win_rate"):
        assert resumed[key] == reference[key], key


def test_a_length_rewarding_reward_model_is_caught_by_the_judge(sft_model, reward_model, tmp_path):
    """A planted reward model that pays for length alone: the answers grow, the exact judge sees them lose to the
    SFT model's while the score rises, and the run is flagged and stopped with the SFT model (step 0) as its best."""
    cfg = load(RLHFConfig, _config(tmp_path, sft_model, reward_model),
               ["guard.win_drop=0.05", "guard.judge_prompts=16", "guard.kl_ceiling=1e9", "rlhf.beta=0.0",
                "reward.missing_eot_penalty=0.0", "optim.lr=2e-3", "train.steps=30", "checkpoint.every=0"])
    result = rlhf(cfg, tmp_path / "run", progress=False, reward=lambda prompts, answers: [len(a) / 4 for a in answers])
    assert result["status"] == "stopped" and result["steps"] < 30
    assert result["stopped_by_guard"].startswith("reward hacking"), result["stopped_by_guard"]
    last = result["guard_checks"][-1]
    assert last["flagged"] and last["win_rate"] < 0.5 - 0.05 and last["score"] > last["best_score"]
    assert result["best_step"] == 0 and result["accuracy_after"] == result["accuracy_before"]  # OUT/model: the best
    rows = _metrics(tmp_path / "run")
    assert rows[-1]["length"] > rows[0]["length"]
    assert (tmp_path / "run" / "model" / "config.json").exists()
