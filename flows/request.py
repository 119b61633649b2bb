"""What an operator asks of a run, and how it becomes a config, options and a run id.

Kept apart from the flows (no Prefect import) so the CLI, tests and the dashboard can
resolve a request the same way the entry flow does. A *config* is a path (``configs/x.yaml``
or absolute) or a bare name (``cluster`` → ``configs/cluster.yaml`` of this checkout).
A resume takes the resolved config and options recorded with the original run, so a
deployment-started run and a CLI run resume identically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from flows.env import LOGGERS
from storage.catalog import Catalog
from talkforge import ops
from talkforge.config import ConfigError, PipelineConfig, load_config, parse_config
from talkforge.plan import RunOptions, select_stages
from talkforge.stages import STAGE_ORDER

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"

# The stage names as a Literal so Prefect's form renders a choice list; built from the
# registry so a new stage appears without editing this line.
StageName = Literal[tuple(STAGE_ORDER)]  # type: ignore[valid-type]


def config_path(config: str) -> Path:
    """A config name or path as a file path (existing paths win over names)."""
    path = Path(config).expanduser()
    if path.exists() or path.suffix in (".yaml", ".yml") or "/" in config:
        return path
    return CONFIGS_DIR / f"{config}.yaml"


@dataclass(frozen=True)
class ResolvedRun:
    """A request made concrete: the config to run, its source and the options."""

    config: PipelineConfig
    config_path: str
    options: RunOptions
    resumed: str | None = None  # the run this one continues


def resolve(
    config: str,
    overrides: list[str],
    stages: list[str] | None,
    from_stage: str | None,
    until_stage: str | None,
    limit: int | None,
    retry_failed: bool,
    force: bool,
    resume_of: str | None,
) -> ResolvedRun:
    """Validate a request; raises :class:`ConfigError` (or ``ValueError``) with a clear line.

    For a resume, ``config``/``overrides`` only locate the catalog; the run's recorded
    config and options are used, with ``retry_failed``/``force`` added when asked.
    """
    import yaml

    path = config_path(config)
    cfg = load_config(path, overrides)
    if resume_of:
        catalog = Catalog(cfg.data_root / "catalog", cfg.catalog)
        target = ops.latest_run_id(catalog) if resume_of == "latest" else resume_of
        info = ops.run_info(catalog, target) if target else None
        if info is None:
            raise ConfigError(
                f"no run {resume_of!r} in {catalog.root}; `talkforge runs` lists runs"
            )
        stored = parse_config(yaml.safe_load(info["config_yaml"]) or {}, f"run {target}")
        options = RunOptions.model_validate_json(info["options_json"])
        update = {"retry_failed": options.retry_failed or retry_failed, "force": force}
        return ResolvedRun(stored, info["config_path"], options.model_copy(update=update), target)
    chosen = select_stages(stages or None, from_stage, until_stage)
    if not chosen:
        raise ValueError("no stage selected: check stages / from_stage / until_stage")
    options = RunOptions(stages=chosen, limit=limit, retry_failed=retry_failed, force=force)
    return ResolvedRun(cfg, str(path), options)


def open_run_log(data_root: Path, run_id: str) -> logging.Handler:
    """Send the run's log (INFO and up, full tracebacks) to ``<data_root>/logs/<run_id>.log``."""
    log_dir = data_root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / f"{run_id}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
        logging.getLogger(name).addHandler(handler)
    return handler


def close_run_log(handler: logging.Handler) -> None:
    for name in LOGGERS:
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def run_log_path(data_root: Path, run_id: str) -> Path:
    return data_root / "logs" / f"{run_id}.log"
