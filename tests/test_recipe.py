"""The recipe: the smoke recipe end to end (every stage's result.json), a rerun that skips what is done, a failing
stage named and resumed from, the wiring between stages, and the checkable benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemmalab.config import load
from gemmalab.errors import GemmalabError
from gemmalab.recipe import STAGES, RecipeConfig, _wiring, recipe, stage_dirs

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "recipes" / "smoke.toml"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("recipe") / "smoke"
    heard = []
    result = recipe(load(RecipeConfig, SMOKE), out, progress=False, on_stage=lambda s, what: heard.append((s, what)))
    return out, result, heard


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the shipped stage configs are named relative to the repository
        yield mp


def test_the_smoke_recipe_runs_every_stage(smoke_run):
    out, result, heard = smoke_run
    assert result["stage"] == "recipe" and result["status"] == "finished"
    assert list(result["stages"]) == list(STAGES)
    assert [w for s, w in heard if w != "running"] == ["finished"] * len(STAGES)
    for stage in STAGES:
        saved = json.loads((out / stage / "result.json").read_text())
        assert saved["status"] == "finished", stage
        assert result["stages"][stage]["status"] == "finished" and result["stages"][stage]["seconds"] >= 0
    # each stage ran on the one before it
    from gemmalab.train.rlhf import RLHFConfig
    from gemmalab.train.sft import SFTConfig

    assert load(SFTConfig, out / "sft" / "config.toml").model.init_from == str(out / "pretrain" / "model")
    rlhf_cfg = load(RLHFConfig, out / "rlhf" / "config.toml")
    assert (rlhf_cfg.model.init_from, rlhf_cfg.reward.model) == (str(out / "sft" / "model"), str(out / "reward" / "model"))
    assert rlhf_cfg.train.steps == 4  # the recipe's `set`, after the stage's own file
    assert (out / "pretrain" / "model" / "tokenizer.model").read_bytes() == \
        (out / "data" / "tokenizer" / "tokenizer.model").read_bytes()
    ev = result["stages"]["eval"]["models"]
    assert set(ev) == {"pretrain", "sft", "rlhf"}
    for name in ev:  # HumanEval cannot fit a 256-position model: said, not hidden
        assert "humaneval" in ev[name]["skipped"] and "checkable" in ev[name]["headline"]
    sxs = result["stages"]["sxs"]["pairs"]
    assert set(sxs) == {"rlhf-vs-sft", "sft-vs-pretrain"} and all(p["judge"]["match"] == "exact" for p in sxs.values())
    assert set(result["stages"]["memorization"]["sources"]) == {"web", "code", "math"}


def test_a_rerun_skips_what_is_done(smoke_run):
    out, _, _ = smoke_run
    stamp = (out / "pretrain" / "result.json").stat().st_mtime_ns
    heard = []
    again = recipe(load(RecipeConfig, SMOKE), out, progress=False, on_stage=lambda s, what: heard.append(what))
    assert heard == ["skipped"] * len(STAGES) and again["status"] == "finished"
    assert (out / "pretrain" / "result.json").stat().st_mtime_ns == stamp


def test_a_failing_stage_is_named_and_the_rerun_starts_there(smoke_run, tmp_path):
    out, _, _ = smoke_run
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("rlhf", "eval", "sxs", "memorization"))
    bad = load(RecipeConfig, SMOKE, ['rlhf.set=["rlhf.algorithm=\\"dpo\\""]'])
    with pytest.raises(GemmalabError, match=r"recipe stage `rlhf` failed .*algorithm"):
        recipe(bad, run, progress=False)
    summary = json.loads((run / "result.json").read_text())
    assert summary["status"] == "failed" and summary["stages"]["rlhf"]["status"] == "failed"
    heard = []
    recipe(load(RecipeConfig, SMOKE), run, progress=False, on_stage=lambda s, what: heard.append((s, what)))
    assert heard[:4] == [(s, "skipped") for s in ("data", "pretrain", "sft", "reward")]
    assert ("rlhf", "running") in heard and json.loads((run / "rlhf" / "result.json").read_text())["status"] == "finished"


def test_wiring_and_config_errors(tmp_path):
    d = stage_dirs(tmp_path)
    assert _wiring("rlhf", d) == [f'model.init_from="{tmp_path}/sft/model"', f'reward.model="{tmp_path}/reward/model"']
    assert _wiring("pretrain", d)[0] == f'data.shards=["{tmp_path}/data/tokens"]'
    with pytest.raises(GemmalabError, match="`rlhf` needs reward"):
        load(RecipeConfig, SMOKE, ["reward.enabled=false"])
    with pytest.raises(GemmalabError, match="sxs.pairs"):
        load(RecipeConfig, SMOKE, ['sxs.pairs=[["rlhf", "rlhf"]]'])
    with pytest.raises(GemmalabError, match="eval.models"):
        load(RecipeConfig, SMOKE, ['eval.models=["teacher"]'])
    tiny = load(RecipeConfig, ROOT / "configs" / "recipes" / "tiny.toml")
    assert tiny.sft.config == "configs/sft/tiny.toml" and tiny.eval.tasks[0] == "checkable"


def test_the_checkable_benchmark_is_the_sft_held_out_split(tiny_tokenizer):
    from gemmalab.data.instruct import BuiltinTasks, builtin_dialogues
    from gemmalab.evaluate.tasks import load_task
    from gemmalab.evaluate.tasks.checkable import chat_prompt, load_checkable

    _, heldout = builtin_dialogues(BuiltinTasks(train=100, heldout=30, seed=2))
    task = load_checkable(30, 2)
    assert [s.prompt for s in task.samples] == [chat_prompt(e["prompt"]) for e in heldout]
    assert [s.gold for s in task.samples] == [e["answer"] for e in heldout]
    assert task.score(task.samples[0], f"  {heldout[0]['answer']}\n") == {"exact_match": 1.0}
    assert task.score(task.samples[0], "nope") == {"exact_match": 0.0}
    messages = [{"role": "user", "content": heldout[0]["prompt"]}]
    assert tiny_tokenizer.encode(chat_prompt(heldout[0]["prompt"])) == \
        tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert len(load_task("checkable").samples) == 200


PLOTS = {"data_drops", "pretrain_loss", "pretrain_lr", "pretrain_throughput", "sft_loss", "reward_loss",
         "reward_accuracy", "rlhf_reward", "rlhf_kl", "rlhf_length", "rlhf_judge", "sxs_win_rates", "memorization_rates"}


def test_the_report_and_the_model_card(smoke_run):
    out, result, _ = smoke_run
    assert result["report"] == {"html": str(out / "report.html"), "card": str(out / "MODEL_CARD.md")}
    page = (out / "report.html").read_text()
    import re

    assert set(re.findall(r'<figure data-plot="([a-z_]+)">', page)) == PLOTS
    assert "http://" not in page and "https://" not in page and "<script" not in page  # self-contained, static
    card = (out / "MODEL_CARD.md").read_text()
    for heading in ("## Model details", "## Intended use", "## Training data", "## Evaluation", "## Memorization",
                    "## Limitations", "## Ethical considerations and risks"):
        assert heading in card
    sft = json.loads((out / "sft" / "result.json").read_text())
    assert f"| held-out checkable accuracy | {sft['accuracy_before']:.4g} | {sft['accuracy_after']:.4g} |" in card
    from gemmalab.cli import main

    assert main(["report", str(out)]) == 0  # writes both again, the same
    assert (out / "report.html").read_text() == page and (out / "MODEL_CARD.md").read_text() == card
    assert main(["report", str(out / "sft")]) == 2  # not a recipe's run directory: a clear error


def test_the_report_loads_in_a_headless_browser(smoke_run, tmp_path):
    """Debian's chromium (make test installs it) opens the page: no console error, every plot decoded and drawn."""
    import shutil
    import subprocess

    out, _, _ = smoke_run
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is not installed: `make test` installs the Debian package"
    probe = ("<script>addEventListener('load', () => { const figs = [...document.querySelectorAll('figure[data-plot]')];"
             " document.title = JSON.stringify(figs.map(f => { const i = f.querySelector('img');"
             " return [f.dataset.plot, i.complete && i.naturalWidth > 0 && i.naturalHeight > 0]; })); });</script>")
    page = tmp_path / "page.html"
    page.write_text((out / "report.html").read_text().replace("</body>", probe + "</body>"))
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    import html
    import re

    title = re.search(r"<title>(.*?)</title>", done.stdout, re.S)
    drawn = dict(json.loads(html.unescape(title.group(1))))
    assert set(drawn) == PLOTS and all(drawn.values()), drawn
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console


@pytest.mark.parametrize("size,params", [("2b", 2_506_172_416), ("7b", None)])
def test_the_full_scale_plans(size, params, capsys):
    """The gemma-2b / gemma-7b recipes checked by a dry run: the report's shapes and token counts, FLOPs, time and
    carbon by hand; nothing is read or allocated (their data files need not exist)."""
    from gemmalab.cli import main
    from gemmalab.recipe import plan

    cfg = load(RecipeConfig, ROOT / "configs" / "recipes" / f"gemma-{size}.toml")
    p = plan(cfg, world_size=8, peak_tflops=989.0, mfu=0.4)
    pre = p["stages"]["pretrain"]
    if params is not None:
        assert pre["parameters"] == params
    assert pre["total_tokens"] == pytest.approx({"2b": 3e12, "7b": 6e12}[size], rel=1e-3)  # the Gemma report's
    assert pre["flops"] == 6 * pre["parameters"] * pre["total_tokens"]
    assert pre["seconds"] == pytest.approx(pre["flops"] / (8 * 989e12 * 0.4))
    assert pre["carbon"]["energy_kwh"] == pytest.approx(700 * 8 * pre["seconds"] / 3.6e6 * 1.1)
    assert p["stages"]["rlhf"]["world_size"] == 1 and p["stages"]["sft"]["parameters"] == pre["parameters"]
    assert list(p["stages"]) == ["data", "pretrain", "sft", "reward", "rlhf"]
    assert main(["recipe", "--config", str(ROOT / "configs" / "recipes" / f"gemma-{size}.toml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "pretrain" in out and "GiB per device" in out and "kg CO2e" in out
