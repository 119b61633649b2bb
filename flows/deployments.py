"""The deployments ``talkforge serve`` offers, and the two small flows only they need.

Served with Prefect's ``serve`` (a Runner in the ``talkforge serve`` process polls the
server and starts each flow run in a subprocess of its own), not a work pool + process
worker: the deployments are Python objects built here from the config, so there is no
``prefect.yaml``, no pool to create and no code storage to configure, and the serve process
is the one container the compose stack needs. A work pool pays off when runs need
per-run infrastructure (Kubernetes jobs, ECS tasks); here the heavy work goes to Ray
either way, so the flow-run process only plans and commits. The cost: runs execute only
while a ``talkforge serve`` is up, and its host must be a Ray node (``--join-ray``) so the
flow-run process is a proper Ray driver (Prefect's docs recommend the same placement).

Deployments (all parameters editable in the UI's run form):

- ``talkforge-run/pipeline`` — every stage;
- ``talkforge-run/stage-<name>`` — that stage alone (its upstream must be committed);
- ``talkforge-ingest/ingest`` — dataset metadata into the catalog, on a cron schedule;
- ``talkforge-report/report`` — every saved dashboard query as a table artifact.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, serve
from prefect.artifacts import create_table_artifact
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.settings import PREFECT_API_URL

from flows.artifacts import artifact_key
from flows.pipeline import talkforge_run
from flows.request import config_path
from storage.catalog import Catalog
from talkforge import ops
from talkforge.config import load_config
from talkforge.stages import STAGE_ORDER

DASHBOARDS_DIR = Path(__file__).resolve().parents[1] / "dashboards"


@flow(name="talkforge-ingest", persist_result=False)
def ingest_flow(config: str = "default", overrides: list[str] | None = None) -> list[dict]:
    """Read the configured datasets' metadata into the catalog (no download).

    Args:
        config: config name (configs/NAME.yaml) or path to a YAML file.
        overrides: key.path=value items.
    """
    rows = ops.ingest(load_config(config_path(config), overrides or []))
    create_table_artifact(rows or [{"dataset": "none"}], key="talkforge-ingest")
    return rows


@flow(name="talkforge-report", persist_result=False)
def report_flow(config: str = "default", overrides: list[str] | None = None) -> dict[str, int]:
    """Run every saved dashboard query; one table artifact each. Returns rows per query.

    Args:
        config: config name (configs/NAME.yaml) or path to a YAML file.
        overrides: key.path=value items.
    """
    cfg = load_config(config_path(config), overrides or [])
    catalog = Catalog(cfg.data_root / "catalog", cfg.catalog)
    counts = {}
    for name, rows, error in ops.report(catalog, DASHBOARDS_DIR):
        table = rows or [{"result": error or "no rows"}]
        create_table_artifact(table, key=artifact_key("report", name), description=name)
        counts[name] = len(rows)
    return counts


def build_deployments(
    config: str, overrides: list[str] | None = None, ingest_cron: str | None = "0 * * * *"
) -> list[RunnerDeployment]:
    """Every deployment of one config (validated here, so a bad config fails at serve time)."""
    load_config(config_path(config), overrides or [])
    base: dict[str, Any] = {"config": config, "overrides": list(overrides or [])}
    common: dict[str, Any] = {
        "tags": ["talkforge", f"config:{Path(config).name}"],
        "entrypoint_type": EntrypointType.MODULE_PATH,
    }
    deployments = [
        talkforge_run.to_deployment(
            "pipeline", parameters=base, description="every stage, in order", **common
        )
    ]
    deployments += [
        talkforge_run.to_deployment(
            f"stage-{stage}",
            parameters={**base, "stages": [stage]},
            description=f"the {stage} stage alone",
            **common,
        )
        for stage in STAGE_ORDER
    ]
    deployments.append(
        ingest_flow.to_deployment(
            "ingest",
            parameters=base,
            cron=ingest_cron,
            description="dataset metadata into the catalog",
            **common,
        )
    )
    deployments.append(
        report_flow.to_deployment(
            "report", parameters=base, description="saved dashboard queries", **common
        )
    )
    return deployments


class ServeError(RuntimeError):
    """``talkforge serve`` cannot start (no Prefect server configured, Ray join failed)."""


def join_ray(address: str) -> None:
    """Start a Ray node on this host in ``address``'s cluster with no CPUs or GPUs of its own,
    so flow runs started here are drivers on a cluster node (``ray.address: auto``) while
    the work goes to the workers. Meant for a container: the node lives as long as it does.
    """
    ray = Path(sys.executable).with_name("ray")
    command = [str(ray), "start", f"--address={address}", "--num-cpus=0", "--num-gpus=0"]
    done = subprocess.run([*command, "--disable-usage-stats"], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ServeError(f"could not join the Ray cluster at {address}: {last[0]}")


def serve_deployments(
    config: str,
    overrides: list[str],
    ingest_cron: str | None,
    limit: int | None = None,
    ray_address: str | None = None,
) -> None:
    """Register every deployment of ``config`` and execute their runs until stopped."""
    if not PREFECT_API_URL.value():
        raise ServeError(
            "no Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api after "
            "`prefect server start`, or use the compose stack)"
        )
    deployments = build_deployments(config, overrides, ingest_cron)
    if ray_address:
        join_ray(ray_address)
    serve(*deployments, limit=limit)
