"""Interactive multi-turn chat in the Gemma dialogue format, streaming the model's answers."""

from __future__ import annotations

import sys
from collections.abc import Callable

from gemmalab.inference.engine import Engine, SamplingParams

HELP = "Commands: /reset starts over, /exit (or Ctrl-D) quits. Ctrl-C stops an answer."


def chat_loop(engine: Engine, params: SamplingParams, system: str | None = None,
              read: Callable[[str], str] = input, write: Callable[[str], None] = sys.stdout.write) -> list[dict]:
    """Read user turns with `read`, stream answers with `write`, until /exit or end of input.

    Returns the conversation. When it outgrows the model's context, the oldest turns are dropped
    (the system message stays).
    """
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    limit = engine.model.config.max_seq_len
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("\n")
            return messages
        command = line.strip()
        if command in ("/exit", "/quit"):
            return messages
        if command == "/reset":
            messages = list(start)
            write("(conversation cleared)\n")
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        ids = engine.tokenizer.apply_chat_template(messages)
        while len(ids) + params.max_new_tokens > limit and len(messages) > len(start) + 1:
            del messages[len(start):len(start) + 2]  # the oldest user/model exchange
            ids = engine.tokenizer.apply_chat_template(messages)
        if len(ids) + params.max_new_tokens > limit:
            messages.pop()
            write(f"(that message is too long: {len(ids)} tokens with a {limit}-token context)\n")
            continue
        write("model> ")
        try:
            out = engine.generate([ids], params, on_token=lambda i, delta, reason: write(delta))[0]
        except KeyboardInterrupt:
            messages.pop()
            write("\n(interrupted)\n")
            continue
        write("\n")
        messages.append({"role": "model", "content": out.text})


def run_chat(engine: Engine, params: SamplingParams, system: str | None = None, model_name: str = "") -> None:
    """The `gemmalab chat` session on the terminal."""
    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    write(f"Chatting with {model_name}. {HELP}\n")
    try:
        chat_loop(engine, params, system, input, write)
    except KeyboardInterrupt:  # Ctrl-C at the prompt ends the session quietly
        write("\n")
