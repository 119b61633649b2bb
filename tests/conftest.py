"""Shared test setup: offline hub, quiet Prefect, one local Ray for the whole session."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="tf-prefect-home-"))

SHARED = Path(__file__).resolve().parents[2] / "shared"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _keep_main_module() -> Iterator[None]:
    """Restore ``sys.modules['__main__']`` after each test: Streamlit's script runner (the
    dashboard tests) installs a fake one, and every later ``spawn`` child would then try to
    re-run that temporary script instead of pytest's entry point and die."""
    main = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = main


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the repo; tests that need it skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present")
    return SHARED


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray shared by every test that needs one (starting Ray costs ~5 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="talkforge-tests"
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One Prefect test server (SQLite in a temp dir) for the session; yields its API URL.

    Flows called in this process use it; pass the URL as PREFECT_API_URL to subprocesses.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


CONFIG = str(REPO / "configs" / "default.yaml")
FAST = ("train.steps=6", "train.checkpoint_every=3")  # a short training keeps the suite fast


def invoke(*args: str) -> str:
    """Run the CLI in this process; fail the test (with its output) on a non-zero exit."""
    from typer.testing import CliRunner

    from talkforge.cli import app

    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def sets(root: Path, sample: Path, *extra: str) -> list[str]:
    """``--set`` arguments pointing the default config at ``root`` and the sample dataset."""
    out: list[str] = []
    for item in (f"project.data_root={root}", f"download.sample.dir={sample}", *FAST, *extra):
        out += ["--set", item]
    return out


@pytest.fixture(scope="session")
def pipeline_root(
    tmp_path_factory: pytest.TempPathFactory, ray_session: None, sample_dir: Path
) -> Path:
    """The whole default pipeline run once through the CLI (shared by the e2e and dashboard
    tests); returns its data root."""
    root = tmp_path_factory.mktemp("e2e")
    invoke("run", "--config", CONFIG, *sets(root, sample_dir))
    return root


@pytest.fixture(scope="session")
def sample_dir(request: pytest.FixtureRequest) -> Path:
    """The generated sample dataset, built once and kept in pytest's cache (~20 s cold)."""
    from tests.download_helpers import sample_root

    return sample_root(request)
