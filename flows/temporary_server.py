"""A temporary Prefect API server for the CLI's runs, booting while the run gets ready.

Without a configured ``PREFECT_API_URL``, Prefect starts a temporary server on its first
API call (``SubprocessASGIServer``): it imports the whole server application into the
calling process (~2.6 s on a 2-core machine) only to spawn ``uvicorn`` in a subprocess, then
waits for that subprocess to boot (~2.7 s more). A CLI run that has nothing to do spends a
third of its time there. :func:`temporary_server` spawns the same command at once, without
importing the server, and the run meets it ready when its flow starts: the boot overlaps
the CLI's own imports and config resolution on the second core.

The server and its database are Prefect's own (``PREFECT_HOME``; the UI stays off, as with
Prefect's temporary server). Like Prefect's, one serves every run of its process and stops
when the process exits; it is also killed by the kernel if the CLI process dies, SIGKILL
included (``PR_SET_PDEATHSIG``) — Prefect's ``atexit`` hook cannot do that. Configured servers
(``PREFECT_API_URL``, ``talkforge serve``'s, a test harness) are used as they are.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

PR_SET_PDEATHSIG = 1
PORT_IN_USE_EXIT = 3  # uvicorn's exit status when it cannot bind
POLL_S = 0.05


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TemporaryServer:
    """``uvicorn`` serving Prefect's API on a free localhost port (see the module doc)."""

    def __init__(self, settings_env: dict[str, str]):
        self._env = {
            **os.environ,
            **settings_env,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def spawn(self) -> None:
        import importlib.util

        spec = importlib.util.find_spec("prefect")
        assert spec is not None and spec.origin is not None
        self.port = _free_port()
        command = [
            sys.executable, "-m", "uvicorn",
            "--app-dir", str(Path(spec.origin).parent.parent),
            "--factory", "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--log-level", "error", "--lifespan", "on",
        ]  # fmt: skip
        preexec = _die_with_parent if sys.platform == "linux" else None
        self.process = subprocess.Popen(command, env=self._env, preexec_fn=preexec)

    def wait_ready(self, timeout_s: float) -> None:
        """Block until ``/api/health`` answers; a port taken meanwhile gets another."""
        if self.ready:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            status = self.process.poll()
            if status == PORT_IN_USE_EXIT:
                self.spawn()
                continue
            if status is not None:
                raise RuntimeError(f"the temporary Prefect server exited with status {status}")
            try:
                if httpx.get(f"{self.api_url}/health", timeout=1).status_code == 200:
                    self.ready = True
                    return
            except httpx.TransportError:
                pass
            time.sleep(POLL_S)
        self.stop()
        raise RuntimeError(f"the temporary Prefect server did not start within {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


_SERVER: TemporaryServer | None = None  # one per process, like Prefect's own


@contextmanager
def temporary_server() -> Iterator[Callable[[], None]]:
    """Use this process's temporary Prefect server inside the block, unless one is
    configured; start it now if it is not running yet.

    Yields ``wait_ready``: the server boots in the background, so enter the block as early
    as possible and call ``wait_ready()`` just before the first Prefect API call (a no-op
    when a configured server is used).

    In a fresh process the server is spawned *before* Prefect is imported (another second
    of overlap), unless ``PREFECT_API_URL`` is in the environment; should Prefect's
    settings then name a server after all (a profile, ``prefect.toml``), it is stopped
    unused. The server reads the same settings sources itself. Like Prefect's own, it
    serves every run of the process (Prefect keeps per-process clients and services bound
    to one API URL) and stops when the process exits. Flow-run heartbeats are off while
    it serves: nobody outlives this process to watch for a missing one, and the run's
    flow would otherwise wait up to 1 s for its heartbeat thread when it ends.
    """
    global _SERVER
    early = _SERVER is None and "prefect" not in sys.modules and "PREFECT_API_URL" not in os.environ
    if early:
        _SERVER = _started(TemporaryServer({}))
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        if early and _SERVER is not None:
            _SERVER.stop()
            _SERVER = None
        yield lambda: None
        return
    if _SERVER is None:
        settings = get_current_settings().to_environment_variables(exclude_unset=True)
        _SERVER = _started(TemporaryServer({k: str(v) for k, v in settings.items()}))
    server = _SERVER
    timeout_s = float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    updates = {PREFECT_API_URL: server.api_url, "flows.heartbeat_frequency": None}
    with temporary_settings(updates=updates):
        yield lambda: server.wait_ready(timeout_s)


def _started(server: TemporaryServer) -> TemporaryServer:
    server.spawn()
    atexit.register(server.stop)
    return server
