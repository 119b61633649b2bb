"""Deployments served by ``talkforge serve``, triggered through the Prefect client.

One ``talkforge serve`` subprocess registers the deployments on the session's Prefect test
server; the tests trigger a run through the client (as the UI does), read back its
catalog rows, artifacts and logs, then see it in ``talkforge status`` and resume it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.exceptions import PrefectHTTPStatusError

from storage.catalog import Catalog
from talkforge.stages import STAGE_ORDER
from tests.conftest import CONFIG, REPO, invoke

pytestmark = pytest.mark.slow

RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")


def overrides(root: Path, sample: Path) -> list[str]:
    return [
        f"project.data_root={root}",
        f"download.sample.dir={sample}",
        "execution.executor=local",  # this test is about Prefect, not Ray
    ]


def as_sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def served(
    prefect_api: str, sample_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, list[str]]]:
    """A running ``talkforge serve``; yields (data root, overrides) once it has registered."""
    root = tmp_path_factory.mktemp("served")
    items = overrides(root, sample_dir)
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cli = str(Path(sys.executable).with_name("talkforge"))
    command = [cli, "serve", "--config", CONFIG, *as_sets(items), "--ingest-cron", "0 3 * * *"]
    log = (root / "serve.log").open("w")
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        with get_client(sync_client=True) as client:
            while True:
                assert proc.poll() is None, (root / "serve.log").read_text()
                try:
                    client.read_deployment_by_name("talkforge-report/report")
                    break
                except Exception:
                    assert time.monotonic() < deadline, "serve registered no deployment"
                    time.sleep(1)
        yield root, items
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def wait_final(flow_run_id: UUID, timeout_s: float = 300) -> object:
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"flow run still {run.state}"
            time.sleep(1)


def test_serve_offers_every_deployment_with_a_validated_form(served: tuple) -> None:
    with get_client(sync_client=True) as client:
        names = {f"{client.read_flow(d.flow_id).name}/{d.name}" for d in client.read_deployments()}
        expected = {
            "talkforge-run/pipeline",
            *(f"talkforge-run/stage-{s}" for s in STAGE_ORDER),
            "talkforge-ingest/ingest",
            "talkforge-report/report",
        }
        assert expected <= names
        pipeline = client.read_deployment_by_name("talkforge-run/pipeline")
        props = pipeline.parameter_openapi_schema["properties"]
        assert {"config", "overrides", "stages", "from_stage", "until_stage", "limit"} <= set(props)
        assert STAGE_ORDER in [
            v["enum"] for v in _walk(props["stages"]) if isinstance(v, dict) and "enum" in v
        ]  # a choice list in the UI form
        assert client.read_deployment_by_name("talkforge-ingest/ingest").schedules
        for bad in ({"stages": ["no-such-stage"]}, {"limit": 0}):
            with pytest.raises(PrefectHTTPStatusError):
                client.create_flow_run_from_deployment(pipeline.id, parameters=bad)


def _walk(node: object) -> Iterator[object]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_a_run_triggered_through_the_client_records_itself(served: tuple) -> None:
    root, items = served
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("talkforge-run/stage-download")
        created = client.create_flow_run_from_deployment(deployment.id, parameters={"limit": 2})
    run = wait_final(created.id)
    assert run.state.is_completed(), (root / "serve.log").read_text()[-4000:]
    run_id = run.name  # the flow run is named after the talkforge run
    assert RUN_ID.fullmatch(run_id)
    assert {"stage:download", "config:default.yaml"} <= set(run.tags)

    catalog = Catalog(root / "catalog")
    events = catalog.query(
        "SELECT event, command FROM runs WHERE run_id = ? ORDER BY event_at", [run_id]
    ).to_pylist()
    assert [e["event"] for e in events] == ["started", "finished"]
    assert events[0]["command"].startswith("prefect deployment talkforge-run/stage-download")
    done = catalog.query(
        "SELECT count(*) AS n FROM items WHERE run_id = ? AND stage = 'download' "
        "AND status = 'done'",
        [run_id],
    ).to_pylist()[0]["n"]
    assert done == 2

    with get_client(sync_client=True) as client:
        keys = [f"{run_id}-download-{k}" for k in ("progress", "counts", "failures")]
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[*keys, f"{run_id}-summary"]))
        )
        by_key = {a.key: a for a in arts}
        assert set(by_key) == {*keys, f"{run_id}-summary"}
        assert float(by_key[keys[0]].data) == 100.0
        assert '"done": 2' in str(by_key[keys[1]].data)
        summary = str(by_key[f"{run_id}-summary"].data)
        assert "finished" in summary and f"?run={run_id}" in summary
        assert f"logs/{run_id}.log" in summary
        stage_runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])
            )
        )
        ids = [run.id, *(r.id for r in stage_runs)]
        assert f"{run_id}-download" in {r.name for r in stage_runs}
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200
        )
    ours = [entry for entry in logs if entry.name.split(".")[0] in ("talkforge", "flows")]
    assert any("download" in entry.message for entry in ours), [e.name for e in logs]

    # the CLI sees and resumes a run the deployment started
    cfg = ["--config", CONFIG, *as_sets(items)]
    out = invoke("status", "--run", run_id, *cfg)
    assert run_id in out and "finished" in out and "prefect deployment" in out
    out = invoke("resume", run_id, *cfg)
    resumed = catalog.query(
        "SELECT run_id FROM runs WHERE event = 'started' ORDER BY event_at DESC LIMIT 1"
    ).to_pylist()[0]["run_id"]
    assert resumed != run_id and resumed in out
    planned = catalog.query(
        "SELECT stage, items, cached_done, to_run FROM stage_runs WHERE run_id = ?", [resumed]
    ).to_pylist()
    assert planned == [{"stage": "download", "items": 2, "cached_done": 2, "to_run": 0}]  # limit 2
