"""Side-by-side evaluation: the statistics against hand-computed cases, planted judges (position, length), the local,
reference and HTTP judges (against a real `gemmalab serve` over loopback, with 429s answered by backoff), resume
without re-asking, the built-in prompts, the command line and comparing two run directories."""

from __future__ import annotations

import dataclasses
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from gemmalab.errors import GemmalabError
from gemmalab.evaluate import winrate
from gemmalab.evaluate.judges import (HTTPJudge, HTTPJudgeSettings, LocalJudge, Pairing, ReferenceJudge, Verdict,
                                      contains_reference, parse_verdict)
from gemmalab.evaluate.sxs import (BUILTIN_PROMPTS, CATEGORIES, JudgeConfig, SideConfig, SxSConfig, read_prompts,
                                   summary_lines, sxs)
from gemmalab.model import Gemma, get_preset

# ---- statistics ------------------------------------------------------------------------------------------------


def test_win_rate_ties_split_and_the_gemma_report_check():
    # Gemma 1.1 IT 7B against Mistral, instruction following: 52.2% wins, 18.1% ties, 29.7% losses -> 61.25%
    outcomes = ["model"] * 522 + ["tie"] * 181 + ["baseline"] * 297
    assert winrate.win_rate(outcomes) == pytest.approx(0.6125)
    assert winrate.win_rate(["model", "tie", "baseline", "baseline"]) == pytest.approx(1.5 / 4)
    f = winrate.summarize(["model", "tie", "baseline", "baseline"], [False, True, False, True], [0, 0, 0, 0])
    assert (f["wins"], f["ties"], f["losses"], f["n"], f["flip_rate"]) == (1, 1, 2, 4, 0.5)
    assert f["lc_win_rate"] == pytest.approx(f["win_rate"])  # no length differences: nothing to control


def test_both_orders_must_agree_for_a_win():
    assert winrate.combine("model", "model") == "model"
    assert winrate.combine("baseline", "baseline") == "baseline"
    assert winrate.combine("model", "baseline") == winrate.combine("baseline", "model") == "tie"
    assert winrate.combine("model", "tie") == winrate.combine("tie", "tie") == "tie"
    with pytest.raises(ValueError):
        winrate.combine("A", "model")


def test_bootstrap_interval_is_seeded_and_has_the_binomial_width():
    scores = [1.0] * 60 + [0.0] * 40
    lo, hi = winrate.bootstrap_ci(scores, seed=3)
    assert winrate.bootstrap_ci(scores, seed=3) == [lo, hi]
    assert lo < 0.6 < hi
    # the normal approximation: 0.6 +- 1.96 * sqrt(0.24 / 100) = [0.504, 0.696]
    assert lo == pytest.approx(0.504, abs=0.03) and hi == pytest.approx(0.696, abs=0.03)
    assert winrate.bootstrap_ci([0.5] * 10) == [0.5, 0.5]


def test_a_judge_that_prefers_longer_answers_shows_in_the_length_controlled_rate():
    rng = np.random.default_rng(0)
    sizes = rng.integers(5, 300, 160)
    longer = np.arange(160) < 120  # the model writes more on 3 prompts in 4
    deltas = np.where(longer, sizes, -sizes)
    scores = longer.astype(float)  # ... and the judge always picks the longer answer
    raw, lc = scores.mean(), winrate.length_controlled_win_rate(scores, deltas)
    assert raw == 0.75 and abs(lc - 0.5) < 0.12
    # a model that is better whatever the lengths keeps its rate
    better = (rng.random(160) < 0.8).astype(float)
    assert winrate.length_controlled_win_rate(better, deltas) == pytest.approx(better.mean(), abs=0.05)


# ---- judges ----------------------------------------------------------------------------------------------------


def test_verdict_parsing_takes_the_last_label():
    assert parse_verdict("A is shorter, but [[A]] misses the point; so [[B]].") == ("B", True)
    assert parse_verdict("[[C]]") == ("tie", True)
    assert parse_verdict(" b. ") == ("B", True)
    assert parse_verdict("I cannot decide.") == ("tie", False)


def test_reference_matching():
    assert contains_reference("It landed in 1969.", "1969")
    assert not contains_reference("In 19690 maybe", "1969")
    assert contains_reference("The capital is CANBERRA!", "Canberra")
    assert contains_reference("pi is about 3.14", "3.14") and not contains_reference("3.141", "3.14")
    assert contains_reference("New  York city", "new york")
    verdicts = ReferenceJudge().judge([Pairing("q", "Paris", "Lyon", "Paris"), Pairing("q", "x", "y", "Paris"),
                                       Pairing("q", "Lyon", "paris.", "Paris")])
    assert [v.choice for v in verdicts] == ["A", "tie", "B"]


# ---- the stage, on tiny models ---------------------------------------------------------------------------------

PROMPTS = [{"id": f"p{i}", "prompt": text, "category": cat, **({"reference": ref} if ref else {})}
           for i, (text, cat, ref) in enumerate([
               ("Name a colour.", "creativity", None), ("Write a word.", "creativity", None),
               ("What is 2 + 2?", "factuality", "4"), ("Capital of France?", "factuality", "Paris"),
               ("Say yes.", "instruction_following", "yes"), ("List two fruits.", "instruction_following", None)])]


@pytest.fixture(scope="module")
def models(tiny_tokenizer, tmp_path_factory):
    """Two tiny models (different weights) with room for a judge's prompt."""
    from gemmalab.checkpoint import save_hf

    root = tmp_path_factory.mktemp("sxs_models")
    out = []
    for seed in (1, 2):
        model = Gemma(dataclasses.replace(get_preset("tiny-gemma"), max_seq_len=2048))
        model.init_weights(std=0.05, seed=seed)
        out.append(str(save_hf(model, root / f"m{seed}", tiny_tokenizer)))
    return out


@pytest.fixture()
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def _cfg(models, prompts_file, judge="reference", **kw) -> SxSConfig:
    return SxSConfig(model=SideConfig(models[0], max_new_tokens=kw.pop("model_tokens", 6)),
                     baseline=SideConfig(models[1], max_new_tokens=kw.pop("baseline_tokens", 6)),
                     judge=JudgeConfig(model=judge), prompts=str(prompts_file), batch_size=4, **kw)


class FirstSeat:
    """Always prefers the answer shown first: pure position bias."""

    calls = 0

    def describe(self):
        return {"kind": "test", "model": "first-seat"}

    def judge(self, pairings):
        FirstSeat.calls += len(pairings)
        return [Verdict("A") for _ in pairings]


def test_a_first_position_judge_gives_fifty_percent_and_flips_every_time(models, prompts_file, tmp_path):
    result = sxs(_cfg(models, prompts_file), tmp_path / "run", progress=False, judge=FirstSeat())
    assert (result["wins"], result["ties"], result["losses"]) == (0, 6, 0)
    assert result["win_rate"] == 0.5 and result["flip_rate"] == 1.0 and result["ci95"] == [0.5, 0.5]
    assert result["winner"].startswith("neither")
    assert set(result["by_category"]) == {"creativity", "factuality", "instruction_following"}
    verdicts = [json.loads(line) for line in (tmp_path / "run" / "verdicts.jsonl").read_text().splitlines()]
    assert sorted(v["key"] for v in verdicts) == sorted(f"p{i}/{o}" for i in range(6) for o in ("ab", "ba"))
    page = (tmp_path / "run" / "sxs.html").read_text()
    assert page.count("<tr id=") == 6 and "first-seat" in page


class Interrupting(FirstSeat):
    """Fails (as a Ctrl-C would) once it has given `budget` verdicts."""

    def __init__(self, budget):
        self.budget = budget

    def judge(self, pairings):
        if self.budget < len(pairings):
            raise KeyboardInterrupt
        self.budget -= len(pairings)
        return super().judge(pairings)


def test_an_interrupted_run_resumes_without_asking_again(models, prompts_file, tmp_path, monkeypatch):
    cfg = _cfg(models, prompts_file)
    FirstSeat.calls = 0
    with pytest.raises(KeyboardInterrupt):
        sxs(cfg, tmp_path / "run", progress=False, judge=Interrupting(4))  # 4 of 12 verdicts, then stopped
    assert FirstSeat.calls == 4
    answers = (tmp_path / "run" / "answers.jsonl").read_text()
    assert len(answers.splitlines()) == 12

    import gemmalab

    monkeypatch.setattr(gemmalab, "load", lambda *a, **k: pytest.fail("a model was loaded again"))
    result = sxs(cfg, tmp_path / "run", progress=False, judge=FirstSeat())
    assert FirstSeat.calls == 12 and result["n"] == 6  # the 8 verdicts missing, and no answer made again
    assert (tmp_path / "run" / "answers.jsonl").read_text() == answers
    with pytest.raises(GemmalabError, match="other settings .*model"):
        sxs(dataclasses.replace(cfg, model=SideConfig(models[0], max_new_tokens=7)), tmp_path / "run",
            progress=False, judge=FirstSeat())


def test_reference_judge_skips_prompts_without_a_known_answer(models, prompts_file, tmp_path):
    result = sxs(_cfg(models, prompts_file), tmp_path / "run", progress=False)
    assert result["prompts"] == 6 and result["judged"] == 3 and result["skipped_no_reference"] == 3
    assert result["flip_rate"] == 0  # a reference judge does not care about seats
    assert result["wins"] + result["ties"] + result["losses"] == 3


def test_local_judge_reads_the_verdict_from_label_probabilities(models):
    import gemmalab
    from gemmalab.inference import Engine

    model, tok = gemmalab.load(models[0])
    judge = LocalJudge(Engine(model, tok), models[0])
    pairings = [Pairing("Name a colour.", "Blue.", "Seven apples and a boat."),
                Pairing("Name a colour.", "Seven apples and a boat.", "Blue.", "blue")]
    verdicts = judge.judge(pairings)
    for v in verdicts:
        assert v.parsed and v.choice in ("A", "B", "tie") and sum(v.probs.values()) == pytest.approx(1, abs=1e-5)
        assert v.choice == max(v.probs, key=v.probs.get)
    assert [v.probs for v in judge.judge(pairings[::-1])] == [v.probs for v in verdicts[::-1]]  # alone per row
    # the probabilities are the model's next-token distribution after the judge's prompt and "[["
    ids, _ = judge._ids(pairings[0])
    logits = model(__import__("torch").tensor([ids]))[0, -1].log_softmax(-1)
    expect = logits[judge.label_ids].softmax(-1).tolist()
    assert list(verdicts[0].probs.values()) == pytest.approx(expect, abs=1e-5)
    # answers too long for the judge's context are shortened, the same share each, and marked
    long = Pairing("Name a colour.", "blue " * 3000, "red " * 3000)
    v = judge.judge([long])[0]
    assert v.truncated and len(judge._ids(long)[0]) <= model.config.max_seq_len


def test_local_judge_in_the_stage_and_its_seat_calibrated_figures(models, prompts_file, tmp_path):
    result = sxs(_cfg(models, prompts_file, judge=models[0]), tmp_path / "run", progress=False)
    verdicts = {(v["id"], v["order"]): v for v in map(json.loads, (tmp_path / "run" / "verdicts.jsonl").open())}
    assert result["judge"]["kind"] == "local" and result["unparsed_verdicts"] == 0 and result["n"] == 6
    wins = losses = 0
    for pid in {pid for pid, _ in verdicts}:  # each side's probability summed over the two seats it sat in
        ab, ba = verdicts[pid, "ab"]["probs"], verdicts[pid, "ba"]["probs"]
        wins += ab["A"] + ba["B"] > ab["B"] + ba["A"]
        losses += ab["A"] + ba["B"] < ab["B"] + ba["A"]
    assert (result["calibrated"]["wins"], result["calibrated"]["losses"]) == (wins, losses)
    assert "flip_rate" not in result["calibrated"] and "seat-calibrated" in "\n".join(summary_lines(result))


# ---- HTTP judge against a real server ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Throttling(http.server.BaseHTTPRequestHandler):
    """A loopback proxy in front of the real server that answers the first `refuse` requests 429."""

    upstream = ""
    refuse = 0
    refused = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            throttle = type(self).refused < type(self).refuse
            type(self).refused += throttle
        if throttle:
            payload = json.dumps({"error": {"message": "slow down", "type": "rate_limit"}}).encode()
            self.send_response(429)
            self.send_header("Retry-After", "0")
        else:
            request = urllib.request.Request(self.upstream + self.path, data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as r:
                payload = r.read()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server(models):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gemmalab", "serve", "--model", models[1], "--model-name", "tiny",
                             "--port", str(port), "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url + "/health", timeout=1).read()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"gemmalab serve exited: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_http_judge_against_gemmalab_serve_with_429_backoff(server, models, prompts_file, tmp_path):
    _Throttling.upstream, _Throttling.refuse, _Throttling.refused = server, 3, 0
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Throttling)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        cfg = SxSConfig(model=SideConfig(models[0], max_new_tokens=4), baseline=SideConfig(models[1], max_new_tokens=4),
                        judge=JudgeConfig(url=f"http://127.0.0.1:{proxy.server_address[1]}/v1", api_model="tiny",
                                          max_tokens=4, backoff_s=0.01, concurrency=2),
                        prompts=str(prompts_file), limit=1)
        result = sxs(cfg, tmp_path / "run", progress=False)
    finally:
        proxy.shutdown()
    assert _Throttling.refused == 3 and result["judge_retries"] == 3  # every 429 answered by a retry
    assert result["n"] == 3 and result["judge"]["kind"] == "http"
    verdicts = [json.loads(line) for line in (tmp_path / "run" / "verdicts.jsonl").read_text().splitlines()]
    assert len(verdicts) == 6 and all(isinstance(v["text"], str) for v in verdicts)
    # a tiny random model writes no verdict: each such reply is a tie, counted
    assert result["unparsed_verdicts"] == sum(not parse_verdict(v["text"])[1] for v in verdicts)


def test_http_judge_errors_are_clear(server):
    dead = HTTPJudge(HTTPJudgeSettings(f"http://127.0.0.1:{_free_port()}/v1", "tiny", retries=1, backoff_s=0))
    with pytest.raises(GemmalabError, match="cannot be reached .* after 2 tries"):
        dead.chat("hello")
    wrong_model = HTTPJudge(HTTPJudgeSettings(server + "/v1", "no-such-model", retries=3, backoff_s=0))
    with pytest.raises(GemmalabError, match="answered 404: The model `no-such-model` does not exist"):
        wrong_model.chat("hello")
    assert wrong_model.retried == 0  # a 404 is not retried
    with pytest.raises(GemmalabError, match="http"):
        HTTPJudgeSettings("127.0.0.1:8000", "tiny")


# ---- prompts, command line, run directories ------------------------------------------------------------------------


def test_builtin_prompts_cover_every_category():
    prompts = read_prompts(BUILTIN_PROMPTS)
    counts = {c: sum(p.category == c for p in prompts) for c in CATEGORIES}
    assert all(n >= 25 for n in counts.values()), counts
    assert {p.category for p in prompts} == set(CATEGORIES)
    assert all(p.reference for p in prompts if p.category == "factuality")


def test_bad_prompt_files_name_the_line(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": 3}\n')
    with pytest.raises(GemmalabError, match=r"p.jsonl, line 2: `prompt` must be a string"):
        read_prompts(bad)
    bad.write_text('{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n')
    with pytest.raises(GemmalabError, match="line 2: id 'x' was used before, on line 1"):
        read_prompts(bad)
    bad.write_text('{"prompt": "a"}\n{"oops": 1}\n')
    with pytest.raises(GemmalabError, match="line 2: missing field"):
        read_prompts(bad)


def test_cli_compares_two_run_directories(models, prompts_file, tmp_path, capsys):
    """Mixture selection: two SFT run directories (each a result.json, a config and its model/) compared."""
    import shutil

    from gemmalab.cli import main

    runs = []
    for name, model in zip(("mix-a", "mix-b"), models):
        run = tmp_path / name
        shutil.copytree(model, run / "model")
        (run / "result.json").write_text(json.dumps({"stage": "sft", "status": "finished"}))
        (run / "config.toml").write_text(f'[data]\ntrain = ["{name}.jsonl"]\n')
        runs.append(str(run))
    out = tmp_path / "sxs"
    code = main(["sxs", "--model", runs[0], "--baseline", runs[1], "--judge", "reference", "--prompts",
                 str(prompts_file), "--max-new-tokens", "4", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0 and "win rate" in printed and "factuality" in printed
    result = json.loads((out / "result.json").read_text())
    assert result["stage"] == "sxs" and result["status"] == "finished"
    assert result["runs"]["model"] == {"run": runs[0], "stage": "sft", "data": {"train": ["mix-a.jsonl"]}}
    assert result["runs"]["baseline"]["data"] == {"train": ["mix-b.jsonl"]}
    assert result["winner"] in ("model", "baseline") or result["winner"].startswith("neither")
    assert summary_lines(result)[-1].startswith(("no clear winner", runs[0], runs[1]))
    for key in ("wins", "ties", "losses", "win_rate", "ci95", "flip_rate", "lc_win_rate", "by_category"):
        assert key in result


def test_cli_refuses_bad_flags_clearly(models, tmp_path, capsys):
    from gemmalab.cli import main

    assert main(["sxs", "--model", models[0], "--baseline", models[1], "--judge-url", "http://127.0.0.1:1/v1"]) == 2
    assert "--judge-model" in capsys.readouterr().err
    bad = tmp_path / "p.jsonl"
    bad.write_text("{not json\n")
    assert main(["sxs", "--model", models[0], "--baseline", models[1], "--judge", "reference", "--prompts", str(bad),
                 "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}, line 1" in capsys.readouterr().err
    assert main(["sxs", "--model", models[0], "--baseline", models[1], "--judge", "reference",
                 "--categories", "poetry", "--out", str(tmp_path / "o")]) == 2
    assert "No prompt has the category poetry" in capsys.readouterr().err
