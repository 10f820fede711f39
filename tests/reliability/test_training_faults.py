"""Training faults: SIGKILL at seeded random points and inside every phase of a checkpoint write, SIGTERM mid-write,
and a checkpoint write that fails (a full disk). After each, `--resume` continues from the newest complete
checkpoint and the run logs bit for bit the losses of an uninterrupted run.

One pretraining run on tiny-gemma is stopped again and again (kill, resume, kill ...): 23 SIGKILLs and a SIGTERM,
then a last resume to the end. The kill points are seeded; where a timed one lands (mid-step, mid-write, mid-prune)
depends on the machine, and every assertion holds wherever it lands. Every process is `gemmalab pretrain` forked
from a forkserver that imported torch and gemmalab once, so a trial costs a fork, not a 4-second interpreter start.
SFT and reward modelling train on the same loop (gemmalab.train.loop.Trainer) and RLHF calls the same
save_checkpoint / load_checkpoint, so one stage covers them.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gemmalab.files import jsonl_lines
from gemmalab.train.checkpoint import MARKER, PHASES, complete_checkpoints

EVERY = 2  # checkpoint every 2 steps, so kills often land in a write
RANDOM_TRIALS = 17
# The phase trials log 4 steps, a random one at most 5 more (it hangs 2 after its target): no trial ends the run.
STEPS = 4 + 5 * RANDOM_TRIALS + 1
SEED = 20240617
GUARD_S = 120  # a hang guard only, never a timing assertion

_CTX = multiprocessing.get_context("forkserver")


def _gemmalab(argv: list[str], log: str, fault: str = "") -> None:
    """A forkserver child: `gemmalab ARGV` with its output appended to LOG; the exit status is the command's.
    `fault`: "fsize" makes every file write past 256 KiB fail (a real OSError inside DCP, as on a full disk);
    "marker" makes writing a checkpoint's COMPLETE file fail with ENOSPC."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if fault == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    elif fault == "marker":
        from gemmalab.train import checkpoint

        real = checkpoint.write_json

        def write_json(path, obj, indent=2):
            if Path(path).name == MARKER:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real(path, obj, indent)

        checkpoint.write_json = write_json
    from gemmalab.cli import main

    sys.exit(main(argv))


class Runs:
    """Starts `gemmalab pretrain --config CONFIG --out RUN --resume ARGS` as forkserver children."""

    def __init__(self, config: Path, logs: Path) -> None:
        self.config, self.logs = config, logs
        self.started: list[multiprocessing.Process] = []

    def start(self, run: Path, *args: str, fault: str = "") -> tuple[multiprocessing.Process, Path]:
        log = self.logs / f"{len(self.started) + 1:02d}.log"
        log.touch()  # read after the kill, which may come before the child opens it
        argv = ["pretrain", "--config", str(self.config), "--out", str(run), "--resume", *args]
        proc = _CTX.Process(target=_gemmalab, args=(argv, str(log), fault))
        proc.start()
        self.started.append(proc)
        return proc, log

    def finish(self, run: Path, *args: str, fault: str = "") -> tuple[int, str]:
        proc, log = self.start(run, *args, fault=fault)
        proc.join(GUARD_S)
        assert proc.exitcode is not None, f"{run}: still running after {GUARD_S} s"
        return proc.exitcode, log.read_text()

    def close(self) -> None:
        """Kill what a failed test left running (a hang waits forever, and would outlive the forkserver)."""
        for proc in self.started:
            if proc.is_alive():
                _kill(proc)


def _wait(proc: multiprocessing.Process, log: Path, until: Callable[[], bool]) -> None:
    deadline = time.monotonic() + GUARD_S
    while not until():
        assert proc.is_alive(), f"exited with {proc.exitcode} before the kill point:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no kill point after {GUARD_S} s:\n{log.read_text()}"
        time.sleep(0.005)


def _kill(proc: multiprocessing.Process, sig: int = signal.SIGKILL) -> int:
    os.kill(proc.pid, sig)
    proc.join(GUARD_S)
    return proc.exitcode


def _logged(run: Path) -> list[float]:
    """The losses in metrics.jsonl, checked to be steps 1, 2, ... in order (a line cut by a kill is left out)."""
    path = run / "metrics.jsonl"
    records = [obj for _, obj, _ in jsonl_lines(path) if obj is not None] if path.is_file() else []
    assert [r["step"] for r in records] == list(range(1, len(records) + 1)), records
    return [r["loss"] for r in records]


def _newest(run: Path) -> int:
    found = complete_checkpoints(run / "checkpoints")
    return found[-1][0] if found else 0


def _resumed_from(log: str) -> int | None:
    """The step the process says it resumed from (None: it did not get that far, or started afresh)."""
    lines = [line for line in log.splitlines() if "resumed from" in line]
    return int(lines[-1].rsplit("(step ", 1)[1].rstrip(")")) if lines else None


def _partial(run: Path) -> str:
    """What a kill left half-written in checkpoints/, for the trial log."""
    d = run / "checkpoints"
    names = sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
    done = {p.name for _, p in complete_checkpoints(d)}
    return ", ".join(n for n in names if n not in done) or "-"


@pytest.fixture(scope="module")
def setup(tiny_tokenizer, tmp_path_factory) -> Iterator[tuple[Runs, list[float]]]:
    """The config (tiny-gemma on shards of the built-in corpus, 1 thread), the forkserver, and the losses of an
    uninterrupted run that writes no checkpoint (so writing them is shown not to change a number)."""
    from gemmalab.data.corpus import write_builtin_corpus
    from gemmalab.data.packing import pack

    root = tmp_path_factory.mktemp("faults")
    files = write_builtin_corpus(root / "docs", max_files=4, math_problems=100)
    pack(files, tiny_tokenizer, root / "tokens", seq_len=32, progress=False)
    config = root / "train.toml"
    # optim.total_steps is fixed, so a shorter run (train.steps=8) follows the reference's schedule step for step.
    config.write_text(f"""
[model]
preset = "tiny-gemma"
[data]
shards = ["{root / 'tokens'}"]
batch_size = 2
seq_len = 32
seed = 1
[optim]
lr = 0.003
warmup_steps = 3
total_steps = {STEPS}
[train]
steps = {STEPS}
log_every = 1
seed = 3
threads = 1
peak_flops = 1e12  # not measured at every start
[checkpoint]
every = {EVERY}
keep = 2
export = false
""")
    (root / "logs").mkdir()
    # Children fork from a server that imported these once (no effect if another test started the server already).
    _CTX.set_forkserver_preload(["gemmalab.cli", "gemmalab.train.pretrain", "torch._dynamo", __name__])
    runs = Runs(config, root / "logs")
    try:
        status, log = runs.finish(root / "reference", "checkpoint.every=0", "checkpoint.at_end=false")
        assert status == 0, log
        reference = _logged(root / "reference")
        assert len(reference) == STEPS
        yield runs, reference
    finally:
        runs.close()


def test_sigkill_anywhere_resumes_from_the_newest_complete_checkpoint_with_the_same_losses(setup, tmp_path):
    """Six kills inside a checkpoint write (one per phase), one SIGTERM inside one, seventeen at seeded random
    points (a random delay after a random step, or after the start), then a resume to the end."""
    runs, reference = setup
    run = tmp_path / "run"
    rng = random.Random(SEED)
    trials: list[str] = []

    def check(newest: int, what: str) -> None:
        assert _newest(run) == newest, what
        losses = _logged(run)
        assert losses == reference[:len(losses)], what  # bit for bit, whoever logged them
        trials.append(f"{what}: newest complete {newest}, partial {_partial(run)}, logged {len(losses)}")

    for phase in [*PHASES, "sigterm"]:
        before = _newest(run)
        step = before + EVERY  # the next checkpoint this process writes
        for marker in run.glob("hang-*"):
            marker.unlink()
        proc, log = runs.start(run, f"debug.hang_at_step={step}",
                               f"debug.hang_in_checkpoint={'model' if phase == 'sigterm' else phase}")
        _wait(proc, log, lambda: (run / f"hang-{step}").exists())
        assert _resumed_from(log.read_text()) == (before or None), log.read_text()
        if phase == "sigterm":  # the write completes, then the run stops: 143
            assert _kill(proc, signal.SIGTERM) == 143, log.read_text()
            check(step, f"SIGTERM in checkpoint {step} after 'model'")
            continue
        assert _kill(proc) == -signal.SIGKILL
        renamed = phase in ("renamed", "marked")
        assert (run / "checkpoints" / f"step-{step:07d}{'' if renamed else '.tmp'}").is_dir()
        check(step if phase == "marked" else before, f"SIGKILL in checkpoint {step} after {phase!r}")

    for _ in range(RANDOM_TRIALS):
        before, last = _newest(run), len(_logged(run))
        target, after_start = last + rng.randint(1, 3), rng.random() < 0.3
        delay = rng.uniform(0.0, 0.6) if after_start else rng.uniform(0.0, 0.05)
        # The hang bounds how far the process can get before the kill: it never finishes the run.
        proc, log = runs.start(run, f"debug.hang_at_step={target + 2}")
        if not after_start:  # else during start-up, the checkpoint load or the first steps
            _wait(proc, log, lambda: len(_logged(run)) >= target)
        time.sleep(delay)
        assert _kill(proc) == -signal.SIGKILL
        resumed = _resumed_from(log.read_text())
        assert resumed in (None, before), log.read_text()  # if it got that far, from the newest complete one
        where = f"{delay:.3f} s after the start" if after_start else f"{delay:.3f} s after step {target}"
        check(_newest(run), f"SIGKILL {where}")

    before, steps = _newest(run), len(_logged(run)) + EVERY + 1  # past every step a killed process logged
    status, log = runs.finish(run, f"train.steps={steps}")
    assert status == 0 and _resumed_from(log) == before, log
    assert _logged(run) == reference[:steps]  # the whole run, bit for bit
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [p.name for _, p in complete_checkpoints(run / "checkpoints")] and len(names) == 2, names
    assert json.loads((run / "result.json").read_text())["final_loss"] == reference[steps - 1]
    print("\n".join(trials))


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_says_so(setup, tmp_path):
    """A write past the file-size limit inside DCP (EFBIG, what a full disk looks like there) and ENOSPC on the
    COMPLETE file: each run exits with status 2 and one message, no partial copy is left, and --resume continues
    from the previous checkpoint with the reference's losses."""
    runs, reference = setup
    run = tmp_path / "run"
    proc, log = runs.start(run, "debug.hang_at_step=2")
    _wait(proc, log, lambda: (run / "hang-2").exists())
    _kill(proc)
    for fault, reason in (("fsize", "File too large"), ("marker", "No space left on device")):
        status, log = runs.finish(run, "train.steps=8", fault=fault)
        ckpts = run / "checkpoints"
        assert status == 2, log
        assert (f"error: Checkpoint step 4 could not be written to {ckpts}: {reason}; its partial copy was removed. "
                f"The previous checkpoint, step 2 ({ckpts / 'step-0000002'}), is intact") in log, log
        assert "Traceback" not in log
        assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002"]
        assert not (run / "result.json").exists()
    status, log = runs.finish(run, "train.steps=8")
    assert status == 0 and _resumed_from(log) == 2, log
    assert _logged(run) == reference[:8]


def test_an_unknown_checkpoint_phase_is_a_named_error():
    from gemmalab.config import load
    from gemmalab.errors import GemmalabError
    from gemmalab.train.pretrain import PretrainConfig

    with pytest.raises(GemmalabError, match=r"`debug.hang_in_checkpoint` must be one of tmp, model, .* got 'halfway'"):
        load(PretrainConfig, None, ["debug.hang_in_checkpoint=halfway"])


def test_a_checkpoint_whose_old_ones_cannot_be_pruned_is_still_complete(tmp_path, monkeypatch, caplog):
    """Deleting an older checkpoint fails after the new one is complete: the write succeeds (with a warning), it does
    not claim the new checkpoint was lost."""
    import torch

    from gemmalab.train import checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def broken_prune(root, keep):
        raise PermissionError(13, "Permission denied", str(root / "step-0000001"))

    monkeypatch.setattr(checkpoint, "_prune", broken_prune)
    final = checkpoint.save_checkpoint(tmp_path, 2, model, optimizer, {"step": 2})
    assert (final / checkpoint.MARKER).is_file()
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [2]
    assert "could not be pruned" in caplog.text
