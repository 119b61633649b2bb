"""The deployments ``talkforge serve`` offers, and the two small flows only they need.

Served with Prefect's ``serve`` (a Runner in the ``talkforge serve`` process polls the
server and starts each flow run in a subprocess of its own), not a work pool + process
worker: the deployments are Python objects built here from the config, so there is no
``prefect.yaml``, no pool to create and no code storage to configure, and the serve process
is the one container the compose stack needs. A work pool pays off when runs need
per-run infrastructure (Kubernetes jobs, ECS tasks); here the heavy work goes to Ray
either way, so the flow-run process only plans and commits.

Deployments (all parameters editable in the UI's run form):

- ``talkforge-run/pipeline`` — every stage;
- ``talkforge-run/stage-<name>`` — that stage alone (its upstream must be committed);
- ``talkforge-ingest/ingest`` — dataset metadata into the catalog, on a cron schedule;
- ``talkforge-report/report`` — every saved dashboard query as a table artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.deployments.runner import EntrypointType, RunnerDeployment

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
