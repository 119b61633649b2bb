"""No process of a killed run outlives it; one trainer owns a training work dir.

The end-to-end test SIGKILLs a real training driver's whole process group mid-training
(the driver runs the train stage on Ray Train over a local Ray it started: Ray's own
processes, the driver actor, Ray Train's controller, two training workers and their loader
processes), asserts that no process of that run is left a few seconds later, and resumes:
the resumed run starts from its last checkpoint and its history holds every step exactly
once. Every process of the run is found by a marker in its environment, which all of them
inherit from the driver. The lock and watchdog tests use plain sleeping Python children.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tasks.lifetime import (
    MARK_ENV,
    OWNER_NAME,
    OWNER_PID_ENV,
    OWNER_START_ENV,
    WorkDirBusy,
    WorkDirLock,
    alive,
    process_start_ticks,
    processes_with_token,
)
from tasks.train import work_dir_for
from tests.conftest import REPO
from tests.lifetime_driver import KEY

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
GONE_WITHIN_S = 5.0
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]
TEST_MARK = "TALKFORGE_LIFETIME_TEST"


def _marked(mark: str) -> list[int]:
    """Pids of live processes whose environment carries ``TEST_MARK=mark``."""
    needle = f"{TEST_MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            env = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _wait_gone(mark: str, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _marked(mark):
            return []
        time.sleep(0.1)
    return _marked(mark)


def _reap(pids: list[int]) -> None:
    for pid in pids:  # do not leak them into the rest of the session
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigkilled_training_leaves_no_process_and_resumes_each_step_once(tmp_path: Path):
    root, steps = tmp_path / "data", 60
    work = work_dir_for(root, KEY)
    history = work / "history.jsonl"
    mark = uuid.uuid4().hex
    driver = [sys.executable, "-m", "tests.lifetime_driver", str(root), str(steps)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", TEST_MARK: mark}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(driver, cwd=REPO, env=env, start_new_session=True)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= 5:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "training ended before it could be killed"
    workers = [json.loads(p.read_text())["pid"] for p in (work / "ranks").glob("worker-*.json")]
    assert len(workers) == 2 and set(workers) <= set(_marked(mark))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    left = _wait_gone(mark, GONE_WITHIN_S)
    _reap(left)
    assert left == [], f"processes of the killed training still alive: {left}"

    done = subprocess.run(driver, cwd=REPO, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    resumed = int(done.stdout.decode().rsplit("resumed_from_step=", 1)[1])
    assert 0 < resumed < steps and resumed % 2 == 0  # a checkpoint (every 2 steps)
    logged = [json.loads(line)["step"] for line in history.read_text().splitlines()]
    assert logged == list(range(1, steps + 1))
    left = _wait_gone(mark, GONE_WITHIN_S)
    _reap(left)
    assert left == []


def test_a_watched_process_dies_with_its_owner(tmp_path: Path):
    """A training process whose owner (the stage process) dies is gone within a second,
    whoever its parent is (a Ray worker's parent is the raylet)."""
    owner = subprocess.Popen(SLEEPER)
    code = "from tasks.lifetime import guard_current_process as g; g(); import time; time.sleep(60)"
    env = {
        **os.environ,
        OWNER_PID_ENV: str(owner.pid),
        OWNER_START_ENV: str(process_start_ticks(owner.pid)),
    }
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)
    try:
        time.sleep(1.0)
        assert child.poll() is None
        owner.kill()
        owner.wait()
        assert child.wait(timeout=GONE_WITHIN_S) == -signal.SIGKILL
    finally:
        for p in (owner, child):
            if p.poll() is None:
                p.kill()


def test_a_loader_process_dies_with_its_training_worker(tmp_path: Path):
    """Loader processes (forked by the DataLoader) get the parent-death signal."""
    pid_file = tmp_path / "child.pid"
    parent_code = (
        "import multiprocessing as mp, pathlib, time\n"
        "from tasks.train_loop import _loader_init\n"
        "def body():\n"
        "    _loader_init(0)\n"
        "    time.sleep(120)\n"
        "p = mp.get_context('fork').Process(target=body)\n"
        "p.start()\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=REPO)
    deadline = time.monotonic() + 60
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    time.sleep(0.5)
    assert alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + GONE_WITHIN_S
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_stale_owner_orphans_are_ended_before_the_new_owner_starts(tmp_path: Path):
    first = WorkDirLock(tmp_path).acquire()
    orphan = subprocess.Popen(
        SLEEPER, env=first.child_env(dict(os.environ)), start_new_session=True
    )
    try:
        first.release()  # what the kernel does when the owner is SIGKILLed
        deadline = time.monotonic() + 10
        while not processes_with_token(first.owner.token) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with_token(first.owner.token) == [orphan.pid]
        with WorkDirLock(tmp_path) as second:
            assert second.previous == first.owner
            assert second.ended == [orphan.pid]
            assert orphan.wait(timeout=5) == -signal.SIGKILL
            record = json.loads((tmp_path / OWNER_NAME).read_text())
            assert record["pid"] == os.getpid() and record["token"] == second.owner.token
    finally:
        if orphan.poll() is None:
            orphan.kill()


def test_a_live_owner_keeps_the_work_dir(tmp_path: Path):
    code = (
        "import sys, time\n"
        "from tasks.lifetime import WorkDirLock\n"
        f"lock = WorkDirLock({str(tmp_path)!r}).acquire()\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(WorkDirBusy, match=f"pid {holder.pid}"):
            WorkDirLock(tmp_path).acquire()
        assert alive(holder.pid)  # a live owner is never killed
    finally:
        holder.kill()
        holder.wait()
    with WorkDirLock(tmp_path) as lock:  # its death frees the lock
        assert lock.previous is not None and lock.previous.pid == holder.pid


def test_token_is_in_the_environment_of_every_child(tmp_path: Path):
    lock = WorkDirLock(tmp_path)
    env = lock.child_env({})
    assert env[MARK_ENV] == lock.owner.token and int(env["TALKFORGE_OWNER_PID"]) == os.getpid()
