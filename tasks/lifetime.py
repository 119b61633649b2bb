"""Process lifetime: no process of a run outlives it, and one trainer owns a work dir.

Three mechanisms, each covering what the others cannot:

- **Work-dir lock** (:class:`WorkDirLock`): an ``flock``-held ``owner.json`` naming pid,
  host, process start time and a run token. The trainer hands the token to every process of
  the training through its environment (:data:`MARK_ENV`; on Ray Train the run's
  ``runtime_env``, which the controller, the workers and their loader processes inherit).
  The kernel drops the ``flock`` when its holder dies, so a free lock with an owner record
  means the owner is gone; any process still carrying that owner's token (an orphan of the
  earlier run) is then SIGKILLed, and waited for, before the new trainer starts. A lock held
  by a live process fails typed and retryable.
- **Watchdog thread** (:func:`start_watchdog`): polls the parent and the owner named in the
  environment (pid plus start time, so a recycled pid is not mistaken for the owner) and
  SIGKILLs its own process when one is gone. Training workers run it: a Ray worker's parent
  is the raylet, not the stage that owns the run, so only the owner check reaches it when the
  stage process dies while Ray lives on. It watches the owner only on the owner's host.
- **Parent-death signal** (:func:`die_with_parent`): Linux ``prctl(PR_SET_PDEATHSIG)``
  through ``ctypes``: the kernel SIGKILLs a process the moment its parent dies, even a
  SIGKILLed parent. Data-loader processes set it (their parent is the training worker), as
  do training workers (parent: the raylet). Caveat: it fires when the parent *thread* that
  forked exits, so loader processes are forked from the worker's main thread.

Across hosts, Ray's ownership does the rest: actors die with the process that created
them, so the Ray Train controller and workers of a dead stage process are killed by Ray.
Everything is Linux-first (``/proc``); elsewhere the lock and watchdog still work, and
orphan detection is limited to what ``/proc`` would have shown.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

MARK_ENV = "TALKFORGE_RUN_MARK"  # the run mark every process of a training carries
OWNER_PID_ENV = "TALKFORGE_OWNER_PID"
OWNER_START_ENV = "TALKFORGE_OWNER_START"
OWNER_HOST_ENV = "TALKFORGE_OWNER_HOST"
LOCK_NAME = "owner.lock"
OWNER_NAME = "owner.json"
PR_SET_PDEATHSIG = 1
WATCH_INTERVAL_S = 0.5


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22),
    ``None`` if it does not exist (or no ``/proc``). A zombie counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int, start_ticks: int | None = None) -> bool:
    """``pid`` runs and, if ``start_ticks`` is given, is the same process (not a reuse)."""
    if pid <= 0:
        return False
    ticks = process_start_ticks(pid)
    if ticks is None:
        if Path("/proc").is_dir():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return start_ticks is None or ticks == start_ticks


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux).

    Returns False where ``prctl`` is unavailable. If the parent already died before the
    call (the race prctl itself cannot see), this process is killed at once.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent or parent == 1:
        os.kill(os.getpid(), sig)
    return True


def start_watchdog(
    owner_pid: int | None = None,
    owner_start_ticks: int | None = None,
    interval_s: float = WATCH_INTERVAL_S,
) -> threading.Thread:
    """A daemon thread that SIGKILLs this process when its parent or ``owner_pid`` dies."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            orphaned = os.getppid() != parent
            owner_gone = owner_pid is not None and not alive(owner_pid, owner_start_ticks)
            if orphaned or owner_gone:
                os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="talkforge-lifetime-watchdog", daemon=True)
    thread.start()
    return thread


def guard_current_process() -> None:
    """Called first thing in a training process: die with the parent and with the owner
    named in the environment (:meth:`WorkDirLock.child_env`) when it runs on this host."""
    die_with_parent()
    owner = os.environ.get(OWNER_PID_ENV)
    start = os.environ.get(OWNER_START_ENV)
    if os.environ.get(OWNER_HOST_ENV, socket.gethostname()) != socket.gethostname():
        owner = None  # another host's pid means nothing here; Ray's ownership covers it
    start_watchdog(int(owner) if owner else None, int(start) if start else None)


def processes_with_token(token: str) -> list[int]:
    """Pids (other than this one) whose environment carries ``MARK_ENV=token``."""
    needle = f"{MARK_ENV}={token}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and process_start_ticks(pid) is not None:
            found.append(pid)
    return found


def end_processes(token: str, timeout_s: float = 10.0) -> list[int]:
    """SIGKILL every process carrying ``token`` and wait until none is left."""
    victims = processes_with_token(token)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and processes_with_token(token):
        time.sleep(0.05)
    left = processes_with_token(token)
    if left:
        raise WorkDirBusy(f"processes {left} of an earlier trainer survived SIGKILL")
    return victims


class WorkDirBusy(RuntimeError):
    """The work dir is owned by another live trainer (or its orphans would not die)."""


@dataclass(frozen=True)
class Owner:
    pid: int
    host: str
    start_ticks: int | None
    started_at: float
    token: str


class WorkDirLock:
    """Exclusive ownership of a training work dir for the life of this process.

    ``acquire`` takes a non-blocking ``flock`` on ``owner.lock``; if another live process
    holds it, :class:`WorkDirBusy` names that owner. Once held, the previous owner's
    record (if any) is read and every process still carrying its token is ended. The new
    owner record is written atomically. ``previous`` and ``ended`` say what was found.
    """

    def __init__(self, work_dir: Path):
        self.work_dir = Path(work_dir)
        self.owner = Owner(
            pid=os.getpid(),
            host=socket.gethostname(),
            start_ticks=process_start_ticks(os.getpid()),
            started_at=time.time(),
            token=uuid.uuid4().hex,
        )
        self.previous: Owner | None = None
        self.ended: list[int] = []
        self._fd: int | None = None

    def read_owner(self) -> Owner | None:
        with contextlib.suppress(OSError, ValueError, TypeError):
            return Owner(**json.loads((self.work_dir / OWNER_NAME).read_text()))
        return None

    def acquire(self) -> WorkDirLock:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.work_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            held = self.read_owner()
            who = f"pid {held.pid} on {held.host}" if held else "another process"
            raise WorkDirBusy(f"training work dir {self.work_dir} is held by {who}") from None
        self._fd = fd
        try:
            self.previous = self.read_owner()
            if self.previous is not None and self.previous.host == self.owner.host:
                self.ended = end_processes(self.previous.token)
            tmp = self.work_dir / f".tmp-{OWNER_NAME}"
            tmp.write_text(json.dumps(asdict(self.owner)))
            os.replace(tmp, self.work_dir / OWNER_NAME)
        except BaseException:
            self.release()
            raise
        return self

    def child_env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` plus the token and owner identity every training process must carry."""
        return {
            **env,
            MARK_ENV: self.owner.token,
            OWNER_PID_ENV: str(self.owner.pid),
            OWNER_START_ENV: "" if self.owner.start_ticks is None else str(self.owner.start_ticks),
            OWNER_HOST_ENV: self.owner.host,
        }

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
