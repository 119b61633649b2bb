"""DualForce through the real CLI on the embedded default: stage 1 → 2 → 3 → generate.

Runs on a copy of the session's default-pipeline catalog (upstream stages cached) with the
three ``configs/dualforce_stage*.yaml`` files and the tiny CPU overrides they document: the
train stage three times (each stage from the previous one's committed checkpoint, looked up
in the catalog), then the generate stage, which samples every committed checkpoint
autoregressively. While stage 3 trains, its worker 1 is SIGKILLed once a few steps are
logged; Ray Train restarts the worker group from the last checkpoint and the run finishes
with every step exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from storage.catalog import Catalog
from tasks.records import TrainedCheckpoint
from tasks.records_eval import GeneratedClip
from tasks.train_data import HISTORY_NAME, RANKS_DIR
from tests.conftest import REPO, invoke, sets

pytestmark = pytest.mark.slow

STEPS = 6
TINY = (
    "train.size=tiny", f"train.steps={STEPS}", "train.checkpoint_every=2", "train.batch_size=1",
    "train.clip_frames=4", "train.mixed_precision=no", "train.gradient_checkpointing=false",
    "train.lr_scheduler=constant", "train.lr_warmup_steps=0", "train.data_workers=0",
    "train.resources={num_workers: 2, num_cpus: 1, num_gpus: 0}",
    "train.lora={attention_rank: 4, ffn_rank: 2}", "train.sampler={steps_per_frame: 2}",
)  # fmt: skip


def _q(root: Path, sql: str, params: list | None = None) -> list[dict]:
    return Catalog(root / "catalog").query(sql, params or []).to_pylist()


def _kill_new_run_worker(work_root: Path, known: set[Path], after_lines: int) -> threading.Thread:
    """SIGKILL worker 1 of the first training work dir not in ``known`` once its history
    holds ``after_lines`` steps."""

    def watch() -> None:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            for work in set(work_root.glob("*")) - known:
                history, record = work / HISTORY_NAME, work / RANKS_DIR / "worker-1.json"
                lines = len(history.read_text().splitlines()) if history.exists() else 0
                if lines >= after_lines and record.exists():
                    os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)
                    return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def chain(pipeline_root: Path, sample_dir: Path, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dualforce") / "data"
    shutil.copytree(pipeline_root, root, ignore=shutil.ignore_patterns("store", "work"))
    args = [*sets(root, sample_dir), "--set", f"project.store_uri={pipeline_root / 'store'}"]
    for item in TINY:
        args += ["--set", item]
    config = {s: str(REPO / "configs" / f"dualforce_stage{s}.yaml") for s in (1, 2, 3)}
    invoke("run", "--config", config[1], *args, "--stages", "train")
    invoke("run", "--config", config[2], *args, "--stages", "train")
    work_root = root / "work" / "train"
    killer = _kill_new_run_worker(work_root, set(work_root.glob("*")), after_lines=3)
    invoke("run", "--config", config[3], *args, "--stages", "train")
    killer.join(timeout=1)
    invoke("run", "--config", config[3], *args, "--stages", "generate")
    recs = {}
    for r in _q(root, "SELECT item_key, record_json FROM items WHERE stage = 'train' "
                      "AND status = 'done' ORDER BY created_at"):  # fmt: skip
        rec = TrainedCheckpoint.model_validate_json(r["record_json"])
        if rec.family == "dualforce":
            recs[rec.training_stage] = (r["item_key"], rec)
    return {"root": root, "recs": recs, "work_root": work_root}


def test_three_stages_train_in_order_each_from_its_parent(chain):
    recs = chain["recs"]
    assert set(recs) == {"stage1", "stage2", "stage3"}
    assert recs["stage1"][1].parent is None
    for child, parent in (("stage2", "stage1"), ("stage3", "stage2")):
        rec, parent_rec = recs[child][1], recs[parent][1]
        assert rec.parent is not None and rec.parent.training_stage == parent
        assert rec.parent.artifact_id == parent_rec.checkpoint.artifact_id
    for stage, terms in (("stage1", {"recon", "flame"}), ("stage2", {"video"}),
                         ("stage3", {"video", "struct", "flame", "lip"})):  # fmt: skip
        rec = recs[stage][1]
        assert rec.num_processes == 2 and [h.step for h in rec.history] == [*range(1, STEPS + 1)]
        assert all(set(h.terms) == terms and h.grad_norm > 0 for h in rec.history), stage
    spec = json.loads(recs["stage3"][1].model_config_json)
    assert spec["training_stage"] == "stage3" and spec["arch"]["fusion_depth"] == 2
    lrs = recs["stage3"][1].history[0].lrs  # LoRA at 5e-5, new modules at 1e-4 (lr_groups)
    assert sorted(lrs) == pytest.approx([5e-5, 1e-4])


def test_killed_stage3_worker_resumes_from_the_last_checkpoint(chain):
    _, rec = chain["recs"]["stage3"]
    assert rec.worker_restarts == 1
    work = next(
        w for w in chain["work_root"].glob("*")
        if (w / RANKS_DIR / "attempts.jsonl").exists() and
        len((w / RANKS_DIR / "attempts.jsonl").read_text().splitlines()) == 2
    )  # fmt: skip
    lines = (work / RANKS_DIR / "attempts.jsonl").read_text().splitlines()
    resumed = json.loads(lines[1])["resumed_from_step"]
    assert resumed > 0 and resumed % 2 == 0  # from a checkpoint, not from scratch
    assert [h.step for h in rec.history] == [*range(1, STEPS + 1)]  # each step once


def test_generate_samples_the_stage3_checkpoint_autoregressively(chain):
    root, (_, rec) = chain["root"], chain["recs"]["stage3"]
    rows = _q(  # the current version of each clip (the copied catalog holds older ones)
        root, "SELECT record_json FROM current_items WHERE stage = 'generate' AND status = 'done'"
    )
    clips = [GeneratedClip.model_validate_json(r["record_json"]) for r in rows]
    assert clips
    for clip in clips:
        mine = [v for v in clip.videos if v.checkpoint_sha256 == rec.checkpoint.sha256]
        assert {v.setting for v in mine} == {"self", "cross"}, clip.notes
        assert all(v.family == "dualforce" and v.num_frames > 0 for v in mine)
        own = next(v for v in mine if v.setting == "self")
        assert own.audio_clip_id == clip.clip_id and clip.fps == pytest.approx(25.0)
    # stage 1 holds only the projector: noted per clip, never a failure
    assert any("projector" in note for clip in clips for note in clip.notes)
