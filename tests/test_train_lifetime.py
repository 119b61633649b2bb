"""No process of a killed run outlives it; one trainer owns a training work dir.

The end-to-end test SIGKILLs a real training driver's whole process group mid-training
(the accelerate launcher and both torchrun ranks run below it, the ranks in their own
sessions), asserts that no process of that training is left a few seconds later, and
resumes: the resumed history holds every step exactly once. The lock tests use plain
``sleep``-like Python children carrying a run token.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.lifetime import (
    MARK_ENV,
    OWNER_NAME,
    WorkDirBusy,
    WorkDirLock,
    alive,
    guarded_command,
    processes_with_token,
)
from tasks.train import work_dir_for
from tests.conftest import REPO
from tests.lifetime_driver import KEY

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
GONE_WITHIN_S = 5.0
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (the training's manifest path)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _wait_gone(text: str, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = _processes_mentioning(text)
        if not left:
            return []
        time.sleep(0.1)
    return _processes_mentioning(text)


@pytest.mark.slow
def test_sigkilled_training_leaves_no_process_and_resumes_each_step_once(tmp_path: Path):
    root, steps = tmp_path / "data", 60
    work = work_dir_for(root, KEY)
    history = work / "history.jsonl"
    driver = [sys.executable, "-m", "tests.lifetime_driver", str(root), str(steps)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(driver, cwd=REPO, env=env, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= 5:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "training ended before it could be killed"
    marker = str(work / "manifest.json")
    assert len(_processes_mentioning(marker)) >= 3  # launcher + two ranks
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    left = _wait_gone(marker, GONE_WITHIN_S)
    for pid in left:  # do not leak them into the rest of the session
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"processes of the killed training still alive: {left}"

    done = subprocess.run(driver, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    resumed = int(done.stdout.decode().rsplit("resumed_from_step=", 1)[1])
    assert 0 < resumed < steps
    logged = [json.loads(line)["step"] for line in history.read_text().splitlines()]
    assert logged == list(range(1, steps + 1))
    assert _processes_mentioning(marker) == []


def test_guarded_command_dies_with_its_parent(tmp_path: Path):
    """A child started through ``guarded_command`` by a SIGKILLed parent is gone at once."""
    pid_file = tmp_path / "child.pid"
    parent_code = (
        "import subprocess, sys, time, pathlib\n"
        f"p = subprocess.Popen({guarded_command(SLEEPER)!r}, start_new_session=True)\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(p.pid))\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=REPO)
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    time.sleep(0.5)  # let the child exec past the wrapper
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
