"""The CLI's temporary Prefect server: it answers once ready, serves every run of its
process, stops when the process exits, and dies with the CLI process even when that
process is SIGKILLed (no server is left behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]

DRIVER = """
import os, sys, time
from flows.temporary_server import temporary_server
from prefect.settings import PREFECT_API_URL

for _ in range(1 if sys.argv[1] == "hold" else 2):
    with temporary_server() as wait_ready:
        wait_ready()
        print(os.getpid(), PREFECT_API_URL.value(), flush=True)
        if sys.argv[1] == "hold":
            time.sleep(600)
"""


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie has exited; only its parent's reaping is left


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Prefect home for both tests: its database is created once."""
    return tmp_path_factory.mktemp("prefect-home")


def _driver(mode: str, home: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(home)
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, mode],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_the_server_answers_and_dies_with_a_killed_cli(prefect_home: Path) -> None:
    driver = _driver("hold", prefect_home)
    try:
        assert driver.stdout is not None
        pid, api_url = driver.stdout.readline().split()
        assert int(pid) == driver.pid and api_url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{api_url}/health", timeout=5).status_code == 200
        (server,) = _children(driver.pid)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
        deadline = time.monotonic() + 15
        while not _gone(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _gone(server), "the temporary server outlived the killed CLI"
    finally:
        driver.kill()
        driver.wait()


def test_one_server_serves_the_process_and_stops_when_it_exits(prefect_home: Path) -> None:
    driver = _driver("twice", prefect_home)
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 0
    first, second = (line.split()[1] for line in out.splitlines())
    assert first == second  # Prefect's clients and services stay bound to one server
    try:
        httpx.get(f"{first}/health", timeout=2)
    except httpx.TransportError:
        return
    raise AssertionError("the temporary server still answers after its process exited")
