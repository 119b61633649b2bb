"""Multi-stage training through the real CLI: stage 1, then stage 2 from stage 1's checkpoint.

Runs on a copy of the session's default-pipeline catalog (upstream stages cached), only the
train stage, twice: ``training_stage=stage1``, then ``training_stage=stage2`` with
``init_from.stage=stage1``, which the planner resolves in the catalog. Checks that each
run's loss decreases on the tiny model, that stage 2's checkpoint names stage 1's as its
parent (record and artifact lineage), that the per-step metrics reach the catalog, and that
a stage whose parent was never trained is blocked with the reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from storage.catalog import Catalog
from tasks.records import TrainedCheckpoint
from tests.conftest import CONFIG, REPO, invoke, sets

pytestmark = pytest.mark.slow


def _q(root: Path, sql: str, params: list | None = None) -> list[dict]:
    return Catalog(root / "catalog").query(sql, params or []).to_pylist()


@pytest.fixture(scope="module")
def staged(pipeline_root: Path, sample_dir: Path, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stages") / "data"
    shutil.copytree(pipeline_root, root, ignore=shutil.ignore_patterns("store", "work"))
    args = [*sets(root, sample_dir), "--set", f"project.store_uri={pipeline_root / 'store'}"]
    stage1 = ["--set", "train.training_stage=stage1"]
    stage2 = ["--set", "train.training_stage=stage2", "--set", "train.init_from.stage=stage1"]
    invoke("run", "--config", CONFIG, *args, *stage1, "--stages", "train")
    invoke("run", "--config", CONFIG, *args, *stage2, "--stages", "train")
    rows = _q(
        root,
        "SELECT item_key, record_json FROM items WHERE stage = 'train' AND status = 'done' "
        "ORDER BY created_at",
    )
    recs = {}
    for r in rows:
        rec = TrainedCheckpoint.model_validate_json(r["record_json"])
        recs[rec.training_stage] = (r["item_key"], rec)
    return {"root": root, "args": args, "recs": recs}


def test_each_stage_trains_and_its_loss_decreases(staged):
    recs = staged["recs"]
    assert {"stage1", "stage2"} <= set(recs)
    for stage in ("stage1", "stage2"):
        rec = recs[stage][1]
        assert rec.family == "musetalk15" and rec.num_processes == 2
        assert [h.step for h in rec.history] == list(range(1, rec.steps + 1))
        assert rec.history[-1].loss < rec.history[0].loss, stage


def test_stage2_starts_from_stage1s_committed_checkpoint(staged):
    (key1, s1), (key2, s2) = staged["recs"]["stage1"], staged["recs"]["stage2"]
    assert s1.parent is None
    assert s2.parent is not None and s2.parent.kind == "parent"
    assert (s2.parent.family, s2.parent.training_stage) == ("musetalk15", "stage1")
    assert s2.parent.artifact_id == s1.checkpoint.artifact_id
    assert s2.parent.sha256 == s1.checkpoint.sha256
    # the catalog's lineage: stage 2's checkpoint was built from stage 1's artifact, and its
    # key is made from stage 1's key
    art = _q(
        staged["root"],
        "SELECT input_artifact_ids FROM artifacts WHERE artifact_id = ?",
        [s2.checkpoint.artifact_id],
    )
    assert s1.checkpoint.artifact_id in art[0]["input_artifact_ids"]
    keys = _q(
        staged["root"],
        "SELECT input_keys_json FROM items WHERE stage = 'train' AND item_key = ?",
        [key2],
    )
    assert json.loads(keys[0]["input_keys_json"])["items"]
    assert key1 in keys[0]["input_keys_json"]
    # stage 2 started from stage 1's weights: its first loss is far below stage 1's first
    assert s2.history[0].loss < s1.history[0].loss


def test_per_step_metrics_reach_the_catalog_and_the_dashboard(staged):
    rows = _q(
        staged["root"],
        "SELECT training_stage, step, loss, grad_norm, samples_per_s, terms_json "
        "FROM train_metrics WHERE training_stage IN ('stage1', 'stage2') ORDER BY 1, 2",
    )
    steps = staged["recs"]["stage1"][1].steps
    assert [r["step"] for r in rows] == [*range(1, steps + 1), *range(1, steps + 1)]
    assert all(r["grad_norm"] > 0 and r["samples_per_s"] > 0 for r in rows)
    saved = REPO / "dashboards" / "17_train_terms.sql"  # starts with a `--` comment
    out = invoke(
        "sql", "--file", str(saved), "--config", CONFIG, *staged["args"], "--format", "json"
    )
    curves = json.loads(out)
    assert {c["training_stage"] for c in curves} >= {"stage1", "stage2"}
    assert all(c["term"] == "loss" for c in curves)  # musetalk15 has no other term


def test_a_stage_whose_parent_was_never_trained_is_blocked(staged):
    never = ["--set", "train.training_stage=stage3", "--set", "train.init_from.stage=nope"]
    invoke("run", "--config", CONFIG, *staged["args"], *never, "--stages", "train")
    rows = _q(
        staged["root"],
        "SELECT blocked_reason FROM stage_runs WHERE stage = 'train' ORDER BY planned_at DESC",
    )
    assert "training_stage=nope" in rows[0]["blocked_reason"]
