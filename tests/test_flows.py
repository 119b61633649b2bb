"""The entry flow's surroundings: request resolution, the per-stage concurrency slot, and the
terminal of a failing run (one line and where to look, no Prefect traceback).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from flows.request import config_path, resolve
from storage.catalog import Catalog
from talkforge.config import ConfigError
from talkforge.stages import STAGE_ORDER
from tests.conftest import CONFIG, REPO


def test_config_names_and_requests_resolve_like_the_cli(tmp_path: Path) -> None:
    assert config_path("cluster") == REPO / "configs" / "cluster.yaml"
    assert config_path(CONFIG) == Path(CONFIG)
    root = [f"project.data_root={tmp_path}"]
    run = resolve("default", root, None, "quality", "features", 3, True, False, None)
    assert run.options.stages == ["quality", "features"]
    assert run.options.limit == 3 and run.options.retry_failed
    assert resolve("default", root, None, None, None, None, False, False, None).options.stages == (
        STAGE_ORDER
    )
    with pytest.raises(ValueError, match="unknown stage"):
        resolve("default", root, ["nope"], None, None, None, False, False, None)
    with pytest.raises(ConfigError, match="no run"):
        resolve("default", root, None, None, None, None, False, False, "20200101-000000-abcdef")
    with pytest.raises(ConfigError, match="not found"):
        resolve(str(tmp_path / "missing.yaml"), [], None, None, None, None, False, False, None)


def test_one_run_at_a_time_per_catalog_stage(prefect_api: str, tmp_path: Path) -> None:
    from flows.pipeline import stage_limit_name, stage_slot

    class Probe:  # what stage_limit_name reads of an engine
        def __init__(self, root: Path):
            self.catalog = Catalog(root)

    name = stage_limit_name(Probe(tmp_path / "a"), "faces")
    assert name != stage_limit_name(Probe(tmp_path / "b"), "faces")
    assert name != stage_limit_name(Probe(tmp_path / "a"), "quality")
    name = f"{name}-{uuid.uuid4().hex[:6]}"  # fresh per test session
    holding, release, second_in = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with stage_slot(name, orphaned=lambda: False):
            holding.set()
            release.wait(60)

    def second() -> None:
        with stage_slot(name, orphaned=lambda: False, poll_s=0.5):
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert holding.wait(60)
    threads[1].start()
    assert not second_in.wait(4)  # waits while the first run holds the stage
    release.set()
    assert second_in.wait(60)
    for t in threads:
        t.join(30)

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    assert limit.limit == 1 and limit.active_slots == 0


def test_a_slot_whose_holder_died_with_its_server_is_freed(prefect_api: str) -> None:
    """A killed CLI run's ephemeral server takes its in-memory leases with it: the slot stays
    occupied with nothing to expire. Only when the catalog has no live holder is it reset."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )

    from flows.pipeline import stage_slot

    name = f"orphan-{uuid.uuid4().hex[:6]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(active_slots=1))
    entered = threading.Event()
    live = threading.Event()
    live.set()

    def run() -> None:
        with stage_slot(name, orphaned=lambda: not live.is_set(), poll_s=0.5):
            entered.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert not entered.wait(3)  # a live holder (per the catalog) is waited for
    live.clear()
    assert entered.wait(30)
    thread.join(30)
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).active_slots == 0


@pytest.mark.slow
def test_a_failing_run_prints_one_line_and_where_to_look(prefect_api: str, tmp_path: Path) -> None:
    root = tmp_path / "data"
    missing = tmp_path / "no-such-metadata"
    cli = str(Path(sys.executable).with_name("talkforge"))
    command = [
        cli, "run", "--config", CONFIG, "--stages", "download",
        "--set", f"project.data_root={root}",
        "--set", "download.sample.enabled=false",
        "--set", f"download.datasets=[{{kind: hdtf, metadata: {missing}}}]",
    ]  # fmt: skip
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "COLUMNS": "400"}  # no wrapping
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert errors[0].startswith("error: run ") and "metadata not found" in errors[0], errors
    assert len(errors) == 2 and errors[1].strip().startswith("see "), errors
    log_path = Path(errors[1].split()[1])
    assert log_path.is_file() and "Traceback" in log_path.read_text()  # the detail is kept
    run = Catalog(root / "catalog").query("SELECT * FROM runs_latest").to_pylist()
    assert run[0]["event"] == "failed" and "metadata not found" in run[0]["message"]
