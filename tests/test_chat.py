"""`gemmalab chat`: the loop behind it, driven by scripted input."""

import subprocess
import sys

import pytest

from gemmalab.inference import Engine, SamplingParams
from gemmalab.inference.chat import chat_loop
from gemmalab.model import Gemma, get_preset


@pytest.fixture(scope="module")
def engine(tiny_tokenizer):
    model = Gemma(get_preset("tiny-gemma3"))
    model.init_weights(std=0.3, seed=0)
    return Engine(model.eval(), tiny_tokenizer, max_batch_size=1)


def _run(engine, lines, params, system=None):
    script, shown = iter(lines), []

    def read(prompt):
        shown.append(prompt)
        try:
            return next(script)
        except StopIteration:
            raise EOFError from None

    return chat_loop(engine, params, system, read, shown.append), "".join(shown)


def test_turns_alternate_and_answers_stream(engine):
    params = SamplingParams(max_new_tokens=6, stop_ids=())
    messages, shown = _run(engine, ["hello there", "and again", "/exit", "never read"], params, system="be brief")
    assert [m["role"] for m in messages] == ["system", "user", "model", "user", "model"]
    # the streamed text is the answer, and each answer continues the whole dialogue so far
    assert messages[2]["content"] in shown and messages[4]["content"] in shown
    expected = engine.generate([engine.tokenizer.apply_chat_template(messages[:4])], params)[0].text
    assert messages[4]["content"] == expected


def test_reset_and_end_of_input(engine):
    messages, shown = _run(engine, ["hi", "/reset", "bye"], SamplingParams(max_new_tokens=3, stop_ids=()))
    assert [m["content"] for m in messages if m["role"] == "user"] == ["bye"] and "cleared" in shown


def test_old_turns_are_dropped_when_the_context_fills(engine):
    params = SamplingParams(max_new_tokens=40, stop_ids=())  # tiny-gemma3 has 256 positions
    messages, _ = _run(engine, [" ".join(["word"] * 40)] * 6, params)
    assert len(engine.tokenizer.apply_chat_template(messages[:-1])) + 40 <= 256  # the last prompt fitted
    assert len([m for m in messages if m["role"] == "user"]) < 6


@pytest.mark.real_model
def test_cli_chat_with_the_real_model(gguf_path):
    run = subprocess.run([sys.executable, "-m", "gemmalab", "chat", "--model", str(gguf_path), "--max-new-tokens", "8",
                          "--temperature", "0"], input="Hello!\n/exit\n", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("you> ") == 2 and "model> " in run.stdout
