"""The command line package: every command parses, bad input exits with status 2 and a message naming the file and
key (no traceback), and the dtype flag takes the same spellings as configs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from gemmalab.cli import COMMANDS, build_parser, main
from gemmalab.errors import GemmalabError

ROOT = Path(__file__).resolve().parents[1]


def test_every_command_has_help(capsys):
    names = set(build_parser()._subparsers._group_actions[0].choices)
    assert names == {"generate", "chat", "serve", "tokenize", "convert", "tokenizer", "data", "pretrain", "sft", "reward", "rlhf", "eval", "sxs", "memorization", "recipe", "report"}
    assert len(COMMANDS) == len(names)
    for argv in [[n, "--help"] for n in names - {"data", "tokenizer"}] + [["data", "prepare", "--help"],
                                                                         ["tokenizer", "train", "--help"]]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0, argv
    assert "key=value" in capsys.readouterr().out


def test_dtype_takes_either_spelling():
    parser = build_parser()
    for spelling, dtype in [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp32", torch.float32),
                            ("float16", torch.float16)]:
        args = parser.parse_args(["generate", "--model", "m", "--prompt", "p", "--dtype", spelling])
        assert args.dtype == dtype
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "a", "b", "--dtype", "int3"])


def test_bad_configs_exit_2_naming_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[inputs]]\npath = "x"\n[executor]\nkind = "k8s"\n')
    assert main(["data", "prepare", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.toml" in err and "`executor.kind`" in err and "Traceback" not in err
    assert main(["pretrain", "--config", str(ROOT / "configs" / "train" / "tiny.toml"), "train.stepz=3"]) == 2
    assert "unknown key `train.stepz`" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_pretrain_dry_run_prints_the_plan(capsys):
    assert main(["pretrain", "--config", str(ROOT / "configs" / "train" / "gemma-2b.toml"), "--dry-run",
                 "--world-size", "8", "train.grad_accum=2"]) == 0
    out = capsys.readouterr().out
    assert "gemma-2b: 2,506,172,416 parameters" in out and "x 2 micro-batches x 8 devices" in out


@pytest.mark.parametrize("argv", [
    ["eval", "--model", "m", "--tasks", "checkable", "--batch-size", "0"],
    ["eval", "--model", "m", "--tasks", "checkable", "--limit", "-2"],
    ["generate", "--model", "m", "--prompt", "hi", "--threads", "-1"],
    ["serve", "--model", "m", "--max-batch-size", "0"],
    ["memorization", "--model", "m", "--corpus", "c", "--prefill-batch", "0"],
    ["sxs", "--model", "a", "--baseline", "b", "--judge", "reference", "--batch-size", "zero"],
    ["generate", "--model", "m", "--prompt", "hi", "--max-new-tokens", "-1"],
    ["generate", "--model", "m", "--prompt", "hi", "--top-k", "0"],
    ["chat", "--model", "m", "--top-p", "1.5"],
    ["chat", "--model", "m", "--temperature", "-0.1"],
    ["chat", "--model", "m", "--temperature", "nan"],
    ["serve", "--model", "m", "--port", "70000"],
    ["eval", "--model", "m", "--tasks", "checkable", "--code-timeout", "0"],
    ["memorization", "--model", "m", "--corpus", "c", "--prefix", "0"],
    ["memorization", "--model", "m", "--corpus", "c", "--threshold", "-1"],
    ["sxs", "--model", "a", "--baseline", "b", "--judge", "reference", "--judge-concurrency", "0"],
    ["sxs", "--model", "a", "--baseline", "b", "--judge", "reference", "--judge-retries", "-1"],
    ["sxs", "--model", "a", "--baseline", "b", "--judge", "reference", "--judge-rps", "0"],
    ["sxs", "--model", "a", "--baseline", "b", "--judge", "reference", "--baseline-top-p", "0"],
    ["tokenizer", "train", "--input", "x", "--out", "o", "--vocab-size", "0"],
    ["tokenizer", "train", "--input", "x", "--out", "o", "--vocab-size", "9", "--input-sentence-size", "-5"],
    ["pretrain", "--config", "c.toml", "--dry-run", "--world-size", "0"],
    ["recipe", "--config", "c.toml", "--dry-run", "--mfu", "2"],
    ["recipe", "--config", "c.toml", "--dry-run", "--peak-tflops", "-1"],
    ["reward", "score", "--model", "m", "--input", "i.jsonl", "--batch-size", "0"],
])
def test_counts_below_one_are_refused_by_name(argv, capsys):
    """--batch-size 0, --threads -1, --top-p 1.5 and the like: a usage error naming the flag (exit 2), not a
    traceback after the model has loaded."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[-2]}" in err and ("must be " in err or "whole number" in err), err
    assert "Traceback" not in err


def _parsers(parser: argparse.ArgumentParser, name: str = "gemmalab"):
    """(command name, parser) for `parser` and every sub-command below it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def test_every_number_flag_of_every_command_is_range_checked():
    """No command takes a bare int or float flag (a count of 0 or -1 would slip through to a traceback); only a
    seed may be any whole number."""
    from gemmalab.cli.reward import _score_parser

    bare = [f"{name} {action.option_strings[0]}"
            for name, parser in [*_parsers(build_parser()), ("gemmalab reward score", _score_parser())]
            for action in parser._actions
            if action.type in (int, float) and action.option_strings != ["--seed"]]
    assert bare == []


def test_the_engine_refuses_a_batch_of_zero():
    from gemmalab.inference import Engine
    from gemmalab.model import Gemma, get_preset

    with pytest.raises(GemmalabError, match="max_batch_size"):
        Engine(Gemma(get_preset("tiny-gemma")), None, max_batch_size=0)


def test_a_whole_number_flag_too_big_for_a_float_is_read_not_a_traceback(capsys):
    """A 400-digit number: int() reads it, a float cannot hold it (the range check was an OverflowError traceback)."""
    args = build_parser().parse_args(["serve", "--model", "m", "--max-batch-size", "9" * 400])
    assert args.max_batch_size == int("9" * 400)
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["serve", "--model", "m", "--port", "9" * 400])
    assert stop.value.code == 2 and "--port" in capsys.readouterr().err
