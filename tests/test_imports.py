"""Start-up cost: the CLI, the config and planning the download stage import no stage's
heavy libraries (stage classes are looked up lazily, section configs live in light
modules), and every registered stage still resolves to its class and config section.

The import checks run in a fresh interpreter: this one has torch loaded by other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from talkforge.config import PipelineConfig
from talkforge.stages import STAGE_ORDER, STAGES
from tests.catalog_helpers import write_talkvid_manifest

REPO = Path(__file__).resolve().parents[1]
HEAVY = (
    "torch",
    "torchvision",
    "transformers",
    "diffusers",
    "cv2",
    "scipy",
    "sklearn",
    "ray",
    "prefect",
)


def _heavy_after(code: str, heavy: tuple[str, ...] = HEAVY) -> list[str]:
    """The ``heavy`` modules a fresh interpreter holds after running ``code``."""
    report = f"import json, sys; print(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\n{report}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cli_config_and_engine_import_no_heavy_library():
    assert _heavy_after("import talkforge.cli, talkforge.config, talkforge.engine") == []


def test_planning_the_download_stage_imports_no_heavy_library(tmp_path):
    manifest = write_talkvid_manifest(tmp_path / "talkvid.json", 8)
    overrides = [
        f"project.data_root={tmp_path / 'data'}",
        "download.sample.enabled=false",
        f"download.datasets=[{{kind: talkvid, metadata: {manifest}}}]",
        "execution.executor=local",
    ]
    code = f"""
from talkforge.config import load_config
from talkforge.engine import Engine
from talkforge.plan import RunOptions

engine = Engine(load_config(None, {overrides!r}))
plan = engine.plan("r1", "download", RunOptions(stages=["download"]), dry_run=True)
assert plan.total == 8, plan.total
engine.close()
"""
    assert _heavy_after(code) == []


def test_every_stage_resolves_to_its_class_and_its_config_section():
    config = PipelineConfig()
    assert list(STAGES) == STAGE_ORDER and "nope" not in STAGES
    for name in STAGE_ORDER:
        cls = STAGES[name]
        assert cls.name == name
        assert isinstance(config.stage(name), cls.config_type), name


# every stage's module, class and planning-time methods need none of these: a run with
# nothing to compute imports no model library
PLANNING_FREE = (
    "torch",
    "accelerate",
    "torchvision",
    "transformers",
    "diffusers",
    "facenet_pytorch",
    "sklearn",
    "scipy",
)


def test_planning_a_stage_imports_none_of_its_models_libraries(tmp_path):
    code = f"""
from talkforge.config import load_config
from talkforge.stages import STAGES
from tasks.base import StageEnv

env = StageEnv(data_root={str(tmp_path)!r}, store_uri={str(tmp_path / "store")!r}, run_id="t")
for name in {STAGE_ORDER!r}:
    stage = STAGES[name](load_config(None).stage(name), env)
    stage.model_specs()
    stage.pool_specs()
    stage.prior_outputs()
"""
    assert _heavy_after(code, PLANNING_FREE) == []
