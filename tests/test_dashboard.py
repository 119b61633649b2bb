"""The browser dashboard: every page on an empty catalog (Streamlit's test client), and every
page in headless Chromium against the default pipeline's catalog, with the numbers it shows
compared to ``talkforge sql`` over the same saved queries.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from talkforge.dashboard.app import PAGES
from talkforge.dashboard.data import fmt, saved_sql
from talkforge.dashboard.pages_data import RULE_COLUMNS
from talkforge.stages import STAGE_ORDER
from tests.conftest import CONFIG, REPO, invoke

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

EMPTY_MESSAGES = {
    "runs": "No runs recorded yet",
    "failures": "No current failures",
    "quality": "No quality verdicts yet",
    "datasets": "No dataset ingested or downloaded yet",
    "versions": "No stage has written an item yet",
    "training": "No training history yet",
    "evaluation": "No evaluation yet",
    "models": "No model has produced a current result yet",
}


def _one_page(path: str, argv: list[str]) -> None:
    from talkforge.dashboard.app import query_for, render

    render(path, query_for(argv))


def test_every_page_says_when_it_has_no_data(tmp_path: Path) -> None:
    from streamlit.testing.v1 import AppTest

    assert {path for path, _, _ in PAGES} == set(EMPTY_MESSAGES)
    argv = ["--config", CONFIG, "--set", f"project.data_root={tmp_path}"]
    for path, _, _ in PAGES:
        at = AppTest.from_function(_one_page, args=(path, argv), default_timeout=60).run()
        assert not at.exception, (path, at.exception)
        shown = [e.value for e in (*at.info, *at.success)]
        assert any(EMPTY_MESSAGES[path] in text for text in shown), (path, shown)


# ---------------------------------------------------------------- in a real browser


def normalized(text: str) -> str:
    return " ".join(text.split())


def sql(root: Path, name: str) -> list[dict]:
    """A saved query's rows as ``talkforge sql`` prints them (JSON)."""
    args = ["--set", f"project.data_root={root}", "--format", "json", "--", saved_sql(name)]
    out = invoke("sql", *args)  # "--": a saved query may start with a "-- comment"
    return json.loads(out)


def row_text(row: dict, columns: list[str]) -> str:
    return " ".join(fmt(row[c]) for c in columns)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """Headless Chromium driven over the DevTools protocol (one tab)."""

    def __init__(self, profile: Path, height_px: int = 1800):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
             "--remote-debugging-port=0", f"--window-size=1400,{height_px}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            port_file = profile / "DevToolsActivePort"
            deadline = time.monotonic() + 60
            while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
                assert time.monotonic() < deadline and self.proc.poll() is None, "no chromium"
                time.sleep(0.2)
            port = port_file.read_text().splitlines()[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
                tab = next(t for t in json.load(r) if t["type"] == "page")
            self.ws = connect(tab["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
            self.next_id = 0
            self.call("Emulation.setDeviceMetricsOverride",
                      width=1400, height=height_px, deviceScaleFactor=1, mobile=False)  # fmt: skip
        except BaseException:
            self._kill()
            raise

    def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                assert "error" not in message, message
                return message["result"]

    def js(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def open(self, url: str, ready_text: str, timeout_s: float = 90) -> str:
        """Load ``url``; wait until the app is idle and shows ``ready_text``; return the text."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        idle_since = None
        while True:
            text = self.js("document.body ? document.body.innerText : ''") or ""
            busy = self.js(
                '!!document.querySelector(\'[data-testid="stStatusWidget"],'
                ' [data-testid="stSkeleton"]\')'
            )
            if ready_text in text and not busy:
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 1.5:
                    return text
            else:
                idle_since = None
            assert time.monotonic() < deadline, f"{url}: never showed {ready_text!r}:\n{text}"
            time.sleep(0.3)

    def screenshot(self, path: Path) -> None:
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        self.ws.close()
        self._kill()

    def _kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # chromium and every helper process it made
        self.proc.wait(10)


@pytest.fixture
def dashboard_url(pipeline_root: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    cli = str(Path(sys.executable).with_name("talkforge"))
    command = [cli, "dashboard", "--config", CONFIG, "--set", f"project.data_root={pipeline_root}",
               "--port", str(port)]  # fmt: skip
    log = (tmp_path / "dashboard.log").open("w")
    proc = subprocess.Popen(
        command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "dashboard.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health") as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                assert time.monotonic() < deadline, "the dashboard never became healthy"
                time.sleep(0.5)
        listening = {
            c.laddr.ip
            for c in psutil.Process(proc.pid).net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
        assert listening == {"127.0.0.1"}  # localhost only by default
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/bootstrap.sh)")
def test_every_page_in_a_real_browser_matches_talkforge_sql(
    pipeline_root: Path, dashboard_url: str, tmp_path: Path
) -> None:
    browser = Browser(tmp_path / "chromium-profile")
    texts: dict[str, str] = {}
    try:
        for path, title, _ in PAGES:
            url = dashboard_url + ("/" if path == "runs" else f"/{path}")
            texts[path] = normalized(browser.open(url, title))
            browser.screenshot(tmp_path / f"{path}.png")
            assert "Traceback" not in texts[path] and "Error" not in texts[path][:200], path
    finally:
        browser.close()
    for path, _, _ in PAGES:
        assert (tmp_path / f"{path}.png").stat().st_size > 10_000  # a rendered page, not blank

    root = pipeline_root
    run = sql(root, "09_runs")[0]
    progress = [r for r in sql(root, "10_run_progress") if r["run_id"] == run["run_id"]]
    assert run["run_id"] in texts["runs"] and len(progress) == len(STAGE_ORDER)
    columns = ["stage", "planned", "cached", "skipped_failed", "to_run", "done", "filtered",
               "failed", "pending"]  # fmt: skip
    for row in progress:
        assert row_text(row, columns) in texts["runs"], row

    failures = sql(root, "04_failures_by_kind")
    if failures:
        assert f"Failed items {fmt(sum(f['items'] for f in failures))}" in texts["failures"]
    else:
        assert "No current failures" in texts["failures"]
    for row in failures:
        assert row_text(row, ["stage", "error_kind", "retryable", "items"]) in texts["failures"]

    rules = sql(root, "03_quality_rules")
    assert rules
    for row in rules:
        assert row_text(row, [c for c in RULE_COLUMNS if c in row]) in texts["quality"], row

    clips = sql(root, "02_dataset_hours")
    assert f"Downloaded clips {fmt(sum(r['clips'] for r in clips))}" in texts["datasets"]
    assert f"Downloaded hours {fmt(sum(r['hours'] for r in clips))}" in texts["datasets"]

    versions = sql(root, "14_versions")
    for stage in {v["stage"] for v in versions}:
        n = sum(v["stage"] == stage for v in versions)
        assert f"{stage} {n} version" in texts["versions"]

    curves = [c for c in sql(root, "15_train_curves") if c["current"]]
    final = max(curves, key=lambda c: c["step"])["loss"]
    assert f"Final loss (current) {fmt(final)}" in texts["training"]

    evals = sql(root, "06_eval_metrics")
    for row in evals:
        shown_columns = [c for c in row if c not in ("family", "setting")]
        assert row_text(row, shown_columns) in texts["evaluation"], row
    if not evals:
        assert "No evaluation yet" in texts["evaluation"]

    models = sql(root, "16_model_origins")
    assert models
    for origin in {m["origin"] for m in models}:
        n = len({m["model"] for m in models if m["origin"] == origin})
        assert f"{origin} models {n}" in texts["models"]
