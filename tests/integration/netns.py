"""A private Linux network namespace per integration-test session.

Why: Orthanc, our listener and the dcmtk tools all talk over 127.0.0.1. In a fresh network namespace
that loopback is ours alone, so fixed well-known ports (Orthanc 8042/4242, our listener 11112) never
clash with other test sessions or services on the machine, and nothing we start is reachable from
outside. Creating one needs root (CAP_SYS_ADMIN), which we have here and in CI.

How we talk into the namespace:

* **Subprocesses** (Orthanc, ``medgru serve``, dcmtk ``echoscu``/``storescu``/``dsrdump``...) are started
  with ``ip netns exec NAME argv...`` (:meth:`NetNamespace.command`, :meth:`run`, :meth:`popen`).
  ``ip netns exec`` replaces itself with the command (execvp), so ``Popen.pid`` is the command's pid.
* **Python code in the test process** (REST calls to Orthanc with ``requests``, a pynetdicom SCU...) runs
  through :meth:`NetNamespace.call`: the function runs on a worker thread that first joined the
  namespace with ``setns(2)`` (through ctypes: ``os.setns`` only exists from Python 3.12). The network
  namespace is a per-thread attribute in Linux, so only that worker thread moves; the rest of pytest
  stays in the host namespace. Sockets keep the namespace they were created in, so everything that
  opens its connections inside ``fn`` works unchanged.

Reaching the host's 127.0.0.1 services (PostgreSQL 5432, Redis 6379) from inside the namespace: the
namespace's loopback is a different interface, so TCP to 127.0.0.1 does NOT reach them (checked:
ECONNREFUSED). The embedded defaults (SQLite + filesystem broker under ``MEDGRU_HOME``) need no network and
are what the spine test uses. Path-bound Unix sockets are not network-namespaced, so PostgreSQL works from
inside through its socket (checked: ``postgresql+psycopg://postgres@/test?host=/var/run/postgresql``).
Redis here has no Unix socket configured; it would need a relay (e.g. ``socat`` from a Unix socket on the
host side to TCP 6379, and inside ``socat TCP-LISTEN:6379,bind=127.0.0.1,fork UNIX-CONNECT:...``) or a veth
pair with a route, which we do not need today.

A session killed with SIGKILL leaves its ``medgru-*`` namespace behind: ``ip netns list``, then
``ip netns pids NAME`` and ``ip netns delete NAME``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import secrets
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

IP = "/usr/sbin/ip" if Path("/usr/sbin/ip").exists() else "ip"
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


class NetnsError(RuntimeError):
    pass


def _setns(path: Path) -> None:
    """Move the calling thread into the network namespace bound at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({path}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def _net_ns_inode(path: str | Path) -> int:
    return os.stat(path).st_ino


class NetNamespace:
    """A named network namespace ``medgru-<random>`` with its loopback up.

    Use as a context manager, or call :meth:`create` and :meth:`destroy` yourself.
    """

    def __init__(self, name: str | None = None, prefix: str = "medgru") -> None:
        self.name = name or f"{prefix}-{secrets.token_hex(4)}"
        self.path = NETNS_DIR / self.name
        self._executor: ThreadPoolExecutor | None = None
        self._created = False

    # lifecycle ----------------------------------------------------------------------------------
    def create(self) -> "NetNamespace":
        proc = subprocess.run([IP, "netns", "add", self.name], capture_output=True, text=True)
        if proc.returncode != 0:
            raise NetnsError(
                f"cannot create network namespace {self.name} (needs root/CAP_SYS_ADMIN): "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        self._created = True
        self.run([IP, "link", "set", "lo", "up"], check=True)
        return self

    def destroy(self, grace_s: float = 10.0) -> None:
        """Stop every process still inside (SIGTERM, then SIGKILL after ``grace_s``), delete the namespace."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if not self._created:
            return
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc = subprocess.run([IP, "netns", "delete", self.name], capture_output=True, text=True)
        if proc.returncode != 0 and self.path.exists():
            raise NetnsError(f"cannot delete network namespace {self.name}: {proc.stderr.strip()}")
        self._created = False

    def __enter__(self) -> "NetNamespace":
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def pids(self) -> list[int]:
        """Processes whose network namespace is this one (never this pytest process itself)."""
        if not self.path.exists():
            return []
        target = _net_ns_inode(self.path)
        me = os.getpid()
        found: list[int] = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                if _net_ns_inode(f"/proc/{entry}/ns/net") == target:
                    found.append(int(entry))
            except OSError as exc:  # process gone, or a kernel thread we may not inspect
                if exc.errno not in (errno.ENOENT, errno.EACCES, errno.ESRCH, errno.EPERM):
                    raise
        return found

    # subprocesses inside --------------------------------------------------------------------------
    def command(self, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        """``argv`` prefixed so that it runs inside the namespace."""
        return [IP, "netns", "exec", self.name, *[os.fspath(a) for a in argv]]

    def run(self, argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.CompletedProcess:
        """``subprocess.run`` inside the namespace (text mode and captured output by default)."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(argv), **kwargs)

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kwargs: Any) -> subprocess.Popen:
        """``subprocess.Popen`` inside the namespace; the returned pid is the command's own."""
        return subprocess.Popen(self.command(argv), **kwargs)

    # Python code inside -----------------------------------------------------------------------------
    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on a thread that joined this namespace; return its result or raise."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=4, thread_name_prefix=f"netns-{self.name}", initializer=_setns, initargs=(self.path,)
            )
        return self._executor.submit(fn, *args, **kwargs).result()

    def __repr__(self) -> str:
        return f"NetNamespace({self.name!r})"


def stop_process(proc: subprocess.Popen, grace_s: float = 20.0) -> int:
    """SIGTERM ``proc``, wait up to ``grace_s``, then SIGKILL; return its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def tail(path: Path, max_chars: int = 20_000) -> str:
    """The end of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return text if len(text) <= max_chars else "...\n" + text[-max_chars:]
