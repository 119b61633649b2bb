"""Shared test setup: offline hub, quiet Prefect, one local Ray for the whole session."""

from __future__ import annotations

import os
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
def sample_dir(request: pytest.FixtureRequest) -> Path:
    """The generated sample dataset, built once and kept in pytest's cache (~20 s cold)."""
    from tests.download_helpers import sample_root

    return sample_root(request)
