"""Hostile input through the real command line: broken or malicious config TOML, JSONL (texts, prompts, task rows,
preference pairs), MMLU CSV, GGUF, safetensors, config.json, tokenizer files, task TOML, flags and run directories,
for every command.

Each case builds its bad input in tmp_path and runs `gemmalab ...` in-process (`gemmalab.cli.main`). Every one
must exit non-zero with a message naming the file and its line or field, print no traceback, and leave no output
that looks complete (no result.json, data card, converted model or trained tokenizer). No model is trained.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import pytest

from gemmalab.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY_TRAIN = ROOT / "configs" / "train" / "tiny.toml"


@dataclass
class Case:
    """A command line, what its error must say (file, line or field), and outputs that must not appear."""

    argv: list[str]
    says: list[str]
    absent: list[Path] = field(default_factory=list)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A working tiny HF model directory with a tokenizer, which cases copy and damage."""
    from gemmalab.checkpoint import save_hf
    from gemmalab.model import Gemma, get_preset

    model = Gemma(get_preset("tiny-gemma"))
    model.init_weights(std=0.02, seed=0)
    return save_hf(model, tmp_path_factory.mktemp("hostile") / "model", tiny_tokenizer)


class Env:
    """What a case builder gets: its folder, and copies of the working model directory."""

    def __init__(self, tmp: Path, model_dir: Path) -> None:
        self.tmp, self._model_dir = tmp, model_dir

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def model(self, name: str = "model") -> Path:
        return Path(shutil.copytree(self._model_dir, self.tmp / name))

    def model_with(self, name: str, content: str | bytes) -> Path:
        """A copy of the model directory with one file replaced."""
        self.model()
        return self.file(f"model/{name}", content).parent

    def patch_config(self, **changes) -> Path:
        d = self.model()
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **changes}))
        return d


# ---- GGUF files ----------------------------------------------------------------------------------------------

def _kv(key: str, value_type: int, payload: bytes) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", value_type) + payload


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def raw_gguf(*kvs: bytes, tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, len(kvs)) + b"".join(kvs)


def huge_string_array(key: str = "tokenizer.ggml.tokens") -> bytes:
    """An array header claiming 2**60 strings, followed by two."""
    return _kv(key, 9, struct.pack("<IQ", 8, 2**60) + _string("a") + _string("b"))


def gguf_file(env: Env, name: str, arch: str = "gemma", tokens: list | None = None, scores: list | None = None,
              block_count: int = 2, unk: object = 3, tokenizer: bool = True) -> Path:
    """A small GGUF written by the gguf package: Gemma metadata, a token embedding and a tokenizer vocabulary."""
    path = env.tmp / name
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64), w.add_embedding_length(8), w.add_block_count(block_count)
    w.add_feed_forward_length(16), w.add_head_count(2), w.add_head_count_kv(1), w.add_key_length(4)
    if tokenizer:
        tokens = tokens if tokens is not None else ["<pad>", "<eos>", "<bos>", "<unk>", "a", "b"]
        w.add_tokenizer_model("llama")
        w.add_array("tokenizer.ggml.tokens", tokens)
        w.add_array("tokenizer.ggml.scores", scores if scores is not None else [0.0] * len(tokens))
        w.add_array("tokenizer.ggml.token_type", [3, 3, 3, 2, 1, 1][:len(tokens)] + [1] * (len(tokens) - 6))
        if isinstance(unk, str):
            w.add_string("tokenizer.ggml.unknown_token_id", unk)
        else:
            w.add_unk_token_id(unk)
    w.add_tensor("token_embd.weight", np.zeros((6, 8), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return path


def _half(data: bytes) -> bytes:
    return data[:len(data) // 2]


def _truncated(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


# ---- the cases -------------------------------------------------------------------------------------------------

def _prompts(env: Env, body: str) -> list[str]:
    p = env.file("prompts.jsonl", body)
    return ["sxs", "--model", str(env.tmp), "--baseline", str(env.tmp), "--judge", "reference", "--prompts", str(p),
            "--out", str(env.tmp / "sxs")]


def _score(env: Env, body: str) -> list[str]:
    return ["reward", "score", "--model", str(env.tmp), "--input", str(env.file("pairs.jsonl", body)),
            "--output", str(env.tmp / "scored.jsonl")]


def _eval(env: Env, tasks: str, *extra: str) -> list[str]:
    return ["eval", "--model", str(env.model()), "--tasks", tasks, "--out", str(env.tmp / "eval"), *extra]


def _arc(env: Env, rows: str) -> list[str]:
    env.file("data/arc_easy/test.jsonl", rows)
    return _eval(env, "arc_easy", "--data-dir", str(env.tmp / "data"))


def _mmlu(env: Env, test_csv: bytes, dev_csv: bytes = b"q,a,b,c,d,A\n" * 5) -> list[str]:
    env.file("data/mmlu/test/anatomy_test.csv", test_csv)
    env.file("data/mmlu/dev/anatomy_dev.csv", dev_csv)
    return _eval(env, "mmlu", "--data-dir", str(env.tmp / "data"))


def _task(env: Env, body: str | bytes, name: str = "mine.toml") -> list[str]:
    env.file("rows.jsonl", '{"q": "a", "c": ["x", "y"], "g": 0}\n')
    return _eval(env, str(env.file(name, body)))


_TASK = 'data = "{rows}"\ndoc_to_text = "{text}"\ndoc_to_choice = "c"\ndoc_to_target = "g"\n'
ARC_ROW = json.dumps({"id": "q", "question": "q?", "answerKey": "A",
                      "choices": {"text": ["x", "y"], "label": ["A", "B"]}})


def _config(env: Env, command: str, body: str | bytes) -> list[str]:
    path = env.file(f"{command}.toml", body)
    return [*command.split(), "--config", str(path), "--out", str(env.tmp / "run")]


CASES: dict[str, Callable[[Env], Case]] = {
    # -- config TOML --
    "config/invalid-toml": lambda e: Case(_config(e, "pretrain", "[train\nsteps = 3\n"),
                                          ["pretrain.toml", "invalid TOML", "line 1"]),
    "config/not-utf8": lambda e: Case(_config(e, "sft", b'out_dir = "caf\xe9"\n'),
                                      ["sft.toml", "not UTF-8", "offset 14"]),
    "config/unknown-key": lambda e: Case(_config(e, "reward", "[train]\nstepz = 3\n"),
                                         ["reward.toml", "unknown key `train.stepz`"]),
    "config/wrong-type": lambda e: Case(_config(e, "rlhf", '[train]\nsteps = "many"\n'),
                                        ["rlhf.toml", "`train.steps` must be int"]),
    "config/table-for-list": lambda e: Case(_config(e, "data prepare", "inputs = 5\n"), ["data prepare.toml", "`inputs`"],
                                            [e.tmp / "run" / "data_card.json"]),
    "config/deep-nesting": lambda e: Case(_config(e, "pretrain", "x = " + "[" * 5000 + "]" * 5000 + "\n"),
                                          ["pretrain.toml: invalid TOML here: nested too deeply"]),
    "config/huge-integer": lambda e: Case(_config(e, "pretrain", "[train]\nsteps = " + "9" * 5000 + "\n"),
                                          ["pretrain.toml: invalid TOML", "4300 digits"]),
    "config/missing-file": lambda e: Case(["recipe", "--config", str(e.tmp / "nope.toml")],
                                          ["config file not found", "nope.toml"]),
    "config/bad-override-type": lambda e: Case(["pretrain", "--config", str(TINY_TRAIN), "--dry-run", "train.steps=many"],
                                               ["tiny.toml (with command-line overrides)", "`train.steps` must be int"]),
    "config/override-without-key": lambda e: Case(["pretrain", "--config", str(TINY_TRAIN), "=5"],
                                                  ["'=5' is not of the form key=value"]),
    "config/recipe-wrong-table": lambda e: Case(_config(e, "recipe", "sft = 3\n"), ["recipe.toml", "`sft`"],
                                                [e.tmp / "run" / "result.json"]),
    "config/data-executor-zero": lambda e: Case(_config(e, "data prepare", '[[inputs]]\npath = "x"\n[executor]\ntasks = 0\n'),
                                                ["data prepare.toml", "`executor.tasks`"]),
    # -- JSONL: texts, preference pairs, prompts, task rows --
    "jsonl/tokenize-bad-line": lambda e: Case(["tokenize", "--model", str(e.model()), "--input",
                                               str(e.file("in.jsonl", '{"text": "a"}\n{nope\n'))],
                                              ["in.jsonl, line 2: not valid JSON"]),
    "jsonl/tokenize-lone-surrogate": lambda e: Case(["tokenize", "--model", str(e.model()), "--input",
                                                     str(e.file("in.jsonl", '{"text": "a"}\n{"text": "x\\ud800"}\n'))],
                                                    ["in.jsonl, line 2", "lone surrogate (U+D800)"]),
    "jsonl/tokenize-not-object": lambda e: Case(["tokenize", "--model", str(e.model()), "--input",
                                                 str(e.file("in.jsonl", '["text"]\n'))],
                                                ["in.jsonl, line 1: expected a JSON object, got list"]),
    "jsonl/tokenize-truncated-gzip": lambda e: Case(
        ["tokenize", "--model", str(e.model()), "--input",
         str(e.file("in.jsonl.gz", _half(gzip.compress(b"".join(b'{"text": "%d"}\n' % i for i in range(5000))))))],
        ["in.jsonl.gz, line", "cannot be read to the end"]),
    "jsonl/tokenize-huge-integer": lambda e: Case(["tokenize", "--model", str(e.model()), "--input",
                                                   str(e.file("in.jsonl", '{"text": ' + "7" * 5000 + "}\n"))],
                                                  ["in.jsonl, line 1: not valid JSON here"]),
    "jsonl/tokenizer-train-missing-text": lambda e: Case(
        ["tokenizer", "train", "--input", str(e.file("c.jsonl", '{"txt": 1}\n')), "--vocab-size", "300",
         "--out", str(e.tmp / "tok")], ["c.jsonl, line 1"], [e.tmp / "tok" / "tokenizer.model"]),
    "jsonl/tokenizer-train-not-utf8": lambda e: Case(
        ["tokenizer", "train", "--input", str(e.file("c.txt", b"ok\n\xff\xfe bad\n")), "--vocab-size", "300",
         "--out", str(e.tmp / "tok")], ["c.txt"], [e.tmp / "tok" / "tokenizer.model"]),
    "jsonl/score-bad-line": lambda e: Case(_score(e, '{"prompt": "p", "response": "r"}\n\n{"prompt": \n'),
                                           ["pairs.jsonl, line 3: not valid JSON"], [e.tmp / "scored.jsonl"]),
    "jsonl/score-ends-with-user": lambda e: Case(
        _score(e, json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"),
        ["pairs.jsonl, line 1", "the last message must be the model's"], [e.tmp / "scored.jsonl"]),
    "jsonl/score-missing-response": lambda e: Case(_score(e, '{"prompt": "p"}\n'),
                                                   ["pairs.jsonl, line 1", '"response"'], [e.tmp / "scored.jsonl"]),
    "jsonl/score-bad-role": lambda e: Case(
        _score(e, json.dumps({"messages": [{"role": "root", "content": "x"}, {"role": "model", "content": "y"}]}) + "\n"),
        ["pairs.jsonl, line 1", "root"], [e.tmp / "scored.jsonl"]),
    "jsonl/prompts-bad-line": lambda e: Case(_prompts(e, '{"prompt": "p", "category": "c", "reference": "r"}\n{x\n'),
                                             ["prompts.jsonl, line 2"], [e.tmp / "sxs" / "result.json"]),
    "jsonl/prompts-wrong-type": lambda e: Case(_prompts(e, '{"prompt": 5, "category": "c"}\n'),
                                               ["prompts.jsonl, line 1", "prompt"], [e.tmp / "sxs" / "result.json"]),
    "jsonl/task-rows-bad-line": lambda e: Case(_arc(e, ARC_ROW + "\n{not json\n"), ["test.jsonl, line 2: not valid JSON"],
                                               [e.tmp / "eval" / "result.json"]),
    "jsonl/task-rows-bad-answer": lambda e: Case(_arc(e, json.dumps({**json.loads(ARC_ROW), "answerKey": "Z"}) + "\n"),
                                                 ["test.jsonl, line 1: task arc_easy cannot render"],
                                                 [e.tmp / "eval" / "result.json"]),
    "jsonl/task-rows-deep-nesting": lambda e: Case(_arc(e, '{"q": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),
                                                   ["test.jsonl, line 1", "nested too deeply"],
                                                   [e.tmp / "eval" / "result.json"]),
    "jsonl/gsm8k-missing-answer": lambda e: Case(
        (e.file("data/gsm8k/test.jsonl", '{"question": "1+1?"}\n'), e.file("data/gsm8k/train.jsonl", ""),
         _eval(e, "gsm8k", "--data-dir", str(e.tmp / "data")))[-1],
        ["test.jsonl, line 1", "answer"], [e.tmp / "eval" / "result.json"]),
    "jsonl/memorization-corpus-meta": lambda e: Case(
        ["memorization", "--model", str(e.model()), "--corpus", str(e.file("tokens/meta.json", "{broken").parent),
         "--out", str(e.tmp / "mem")], ["meta.json"], [e.tmp / "mem" / "result.json"]),
    "csv/mmlu-short-row": lambda e: Case(_mmlu(e, b"q,a,b,c,d,A\nq,a,b,c,B\n"),
                                         ["anatomy_test.csv, line 2: expected 6 fields, got 5"],
                                         [e.tmp / "eval" / "result.json"]),
    "csv/mmlu-not-utf8": lambda e: Case(_mmlu(e, b"q,a,b,c,d,A\n", b"\xff\xfe,a,b\n"),
                                        ["anatomy_dev.csv cannot be read", "utf-8"], [e.tmp / "eval" / "result.json"]),
    "csv/mmlu-huge-field": lambda e: Case(_mmlu(e, b"q,a,b,c,d," + b"x" * 200_000), ["anatomy_test.csv",
                                                                                       "field larger than field limit"],
                                          [e.tmp / "eval" / "result.json"]),
    # -- GGUF --
    "gguf/huge-string-array": lambda e: Case(["generate", "--model", str(e.file("m.gguf", raw_gguf(huge_string_array()))),
                                              "--prompt", "hi"],
                                             ["m.gguf", "'tokenizer.ggml.tokens'", "1,152,921,504,606,846,976"]),
    "gguf/huge-float-array": lambda e: Case(
        ["tokenize", "--model", str(e.file("m.gguf", raw_gguf(_kv("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 2**50))))),
         "--text", "hi"], ["m.gguf", "'tokenizer.ggml.scores'", "array of FLOAT32"]),
    "gguf/huge-kv-count": lambda e: Case(["convert", str(e.file("m.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 2**62))),
                                          str(e.tmp / "out")], ["m.gguf", "GGUF.kv_count"], [e.tmp / "out"]),
    "gguf/huge-tensor-count": lambda e: Case(["chat", "--model", str(e.file("m.gguf", raw_gguf(tensors=2**40)))],
                                             ["m.gguf", "GGUF.tensor_count"]),
    "gguf/huge-key-length": lambda e: Case(
        ["generate", "--model", str(e.file("m.gguf", b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 2**61) + bytes(16))),
         "--prompt", "x"],
        ["m.gguf", "metadata key: a length of 2,305,843,009,213,693,952 cannot fit"]),
    "gguf/truncated": lambda e: Case(["tokenize", "--model", str(_truncated(gguf_file(e, "m.gguf"), 200)), "--text", "x"],
                                     ["m.gguf", "not a readable GGUF"]),
    "gguf/bad-magic": lambda e: Case(["serve", "--model", str(e.file("m.gguf", b"GGUX" + bytes(64)))],
                                     ["m.gguf", "not a readable GGUF"]),
    "gguf/not-gemma": lambda e: Case(["generate", "--model", str(gguf_file(e, "m.gguf", arch="llama")), "--prompt", "x"],
                                     ["m.gguf", "general.architecture is 'llama'"]),
    "gguf/billion-layers": lambda e: Case(["generate", "--model", str(gguf_file(e, "m.gguf", block_count=10**9)),
                                           "--prompt", "x"], ["m.gguf", "n_layers must be at most 4096"]),
    "gguf/more-layers-than-tensors": lambda e: Case(["generate", "--model", str(gguf_file(e, "m.gguf",
                                                                                       block_count=1000)),
                                                     "--prompt", "x"], ["m.gguf", "0 layer(s), but its config says 1000"]),
    "gguf/tokens-not-strings": lambda e: Case(["tokenize", "--model", str(gguf_file(e, "m.gguf", tokens=[1, 2, 3, 4, 5, 6])),
                                               "--text", "x"], ["m.gguf", "tokenizer.ggml.tokens"]),
    "gguf/scores-length": lambda e: Case(["tokenize", "--model", str(gguf_file(e, "m.gguf", scores=[0.0])),
                                          "--text", "x"], ["m.gguf", "differ in length"]),
    "gguf/unknown-id-string": lambda e: Case(["tokenize", "--model", str(gguf_file(e, "m.gguf", unk="three")),
                                              "--text", "x"], ["m.gguf", "tokenizer.ggml.unknown_token_id"]),
    "gguf/no-tokenizer": lambda e: Case(["tokenize", "--model", str(gguf_file(e, "m.gguf", tokenizer=False)),
                                         "--text", "x"], ["m.gguf", "tokenizer.ggml.model"]),
    "gguf/eval-leaves-no-result": lambda e: Case(
        ["eval", "--model", str(e.file("m.gguf", raw_gguf(huge_string_array()))), "--tasks", "checkable",
         "--out", str(e.tmp / "eval")], ["m.gguf", "cannot fit"], [e.tmp / "eval" / "result.json"]),
    # -- safetensors --
    "safetensors/truncated": lambda e: Case(
        ["generate", "--model", str(_truncated(e.model() / "model.safetensors", 3000).parent), "--prompt", "x"],
        ["model.safetensors is not a readable safetensors file"]),
    "safetensors/huge-header": lambda e: Case(
        ["generate", "--model", str(e.model_with("model.safetensors", struct.pack("<Q", 2**60) + b"{}")), "--prompt", "x"],
        ["model.safetensors is not a readable safetensors file"]),
    "safetensors/header-not-json": lambda e: Case(
        ["convert", str(e.model_with("model.safetensors", struct.pack("<Q", 9) + b"{not json")), str(e.tmp / "out")],
        ["model.safetensors is not a readable safetensors file"], [e.tmp / "out"]),
    "safetensors/index-escapes": lambda e: Case(
        ["generate", "--model", str(e.model_with("model.safetensors.index.json",
                                                 '{"weight_map": {"model.norm.weight": "../../etc/passwd"}}')),
         "--prompt", "x"],
        ["model.safetensors.index.json", "weight_map['model.norm.weight'] must be a file name"]),
    "safetensors/index-not-json": lambda e: Case(
        ["generate", "--model", str(e.model_with("model.safetensors.index.json", "[")), "--prompt", "x"],
        ["model.safetensors.index.json is not valid JSON"]),
    # -- config.json --
    "hf-config/not-json": lambda e: Case(["generate", "--model", str(e.model_with("config.json", "{nope")),
                                          "--prompt", "x"], ["config.json is not valid JSON"]),
    "hf-config/not-object": lambda e: Case(["chat", "--model", str(e.model_with("config.json", "[1]"))],
                                           ["config.json must hold a JSON object"]),
    "hf-config/wrong-type": lambda e: Case(["generate", "--model", str(e.patch_config(hidden_size="big")),
                                            "--prompt", "x"], ["config.json", "field 'hidden_size' must be a whole number"]),
    "hf-config/missing-key": lambda e: Case(["convert", str(e.patch_config(intermediate_size=None)), str(e.tmp / "out")],
                                            ["config.json", "'intermediate_size' is missing"], [e.tmp / "out"]),
    "hf-config/object-for-list": lambda e: Case(["eval", "--model", str(e.patch_config(layer_types={"a": 1})),
                                                 "--tasks", "checkable", "--out", str(e.tmp / "eval")],
                                                ["config.json", "field 'layer_types' must be a list"],
                                                [e.tmp / "eval" / "result.json"]),
    "hf-config/absent": lambda e: Case(["generate", "--model", str(e.file("empty/x.txt", "").parent), "--prompt", "x"],
                                       ["config.json is missing"]),
    # -- tokenizer files --
    "tokenizer/garbage-model": lambda e: Case(["tokenize", "--model", str(e.model_with("tokenizer.model", b"\x08\xff" * 64)),
                                               "--text", "x"], ["tokenizer.model is not a valid SentencePiece model"]),
    "tokenizer/empty-model": lambda e: Case(["tokenize", "--model", str(e.file("t/tokenizer.model", b"")), "--text", "x"],
                                            ["tokenizer.model"]),
    "tokenizer/convert-garbage": lambda e: Case(["convert", str(e.model()), str(e.tmp / "out"), "--tokenizer",
                                                 str(e.file("bad.model", b"not a proto at all"))],
                                                ["bad.model is not a valid SentencePiece model"], [e.tmp / "out"]),
    # -- task TOML --
    "task/invalid-toml": lambda e: Case(_task(e, "data = \n"), ["mine.toml: invalid TOML", "line 1"],
                                        [e.tmp / "eval" / "result.json"]),
    "task/not-utf8": lambda e: Case(_task(e, b'data = "\xff"\n'), ["mine.toml: not UTF-8 text (byte 0xff at offset 8)"],
                                    [e.tmp / "eval" / "result.json"]),
    "task/attribute-walk": lambda e: Case(
        _task(e, _TASK.format(rows=e.tmp / "rows.jsonl", text="{{ ''.__class__.__mro__[1].__subclasses__() }}")),
        ["rows.jsonl, line 1", "SecurityError"], [e.tmp / "eval" / "result.json"]),
    "task/unbounded-repeat": lambda e: Case(
        _task(e, _TASK.format(rows=e.tmp / "rows.jsonl", text="{{ 'a' * 10**10 }}")),
        ["rows.jsonl, line 1", "SecurityError"], [e.tmp / "eval" / "result.json"]),
    "task/name-escapes": lambda e: Case(_task(e, 'name = "../../x"\n' + _TASK.format(rows="r", text="q")),
                                        ["mine.toml: task name '../../x'"], [e.tmp / "eval" / "result.json"]),
    "task/missing-fields": lambda e: Case(_task(e, 'data = "x.jsonl"\n'), ["mine.toml, task mine: missing field(s)"],
                                          [e.tmp / "eval" / "result.json"]),
    "task/wrong-field-type": lambda e: Case(_task(e, _TASK.format(rows="r", text="q") + 'num_fewshot = "two"\n'),
                                            ["mine.toml, task mine: field num_fewshot"], [e.tmp / "eval" / "result.json"]),
    # -- flags --
    "flag/batch-size-zero": lambda e: Case(["eval", "--model", "m", "--tasks", "x", "--batch-size", "0"],
                                           ["argument --batch-size", "must be >= 1"]),
    "flag/threads-negative": lambda e: Case(["generate", "--model", "m", "--prompt", "x", "--threads", "-1"],
                                            ["argument --threads", "must be >= 1"]),
    "flag/top-p-out-of-range": lambda e: Case(["chat", "--model", "m", "--top-p", "2"], ["argument --top-p", "in (0, 1]"]),
    "flag/port-negative": lambda e: Case(["serve", "--model", "m", "--port", "-1"], ["argument --port"]),
    "flag/limit-not-a-number": lambda e: Case(["sxs", "--model", "a", "--baseline", "b", "--judge", "reference",
                                               "--limit", "ten"], ["argument --limit", "expected a whole number, got 'ten'"]),
    "flag/unknown": lambda e: Case(["tokenize", "--model", "m", "--text", "x", "--bogus"],
                                   ["unrecognized arguments: --bogus"]),
    "flag/convert-to": lambda e: Case(["convert", str(e.model()), str(e.tmp / "out"), "--to", "gguf"],
                                      ["--to gguf: only the Hugging Face layout"], [e.tmp / "out"]),
    # -- run directories --
    "report/no-result": lambda e: Case(["report", str(e.file("run/config.toml", "").parent)], ["run"]),
    "report/garbage-result": lambda e: Case(["report", str(e.file("run/result.json", "{oops").parent)],
                                            ["result.json cannot be read"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_a_named_error(name, tmp_path, model_dir, capsys):
    case = CASES[name](Env(tmp_path, model_dir))
    try:
        code = main(case.argv)
    except SystemExit as e:  # usage errors: argparse exits 2
        code = e.code
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert code not in (0, None), said
    assert "Traceback" not in said
    for text in case.says:
        assert text in said, (text, said)
    assert [str(p) for p in case.absent if p.exists()] == []
