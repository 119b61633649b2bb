"""End to end: the whole default pipeline through the CLI, Prefect flows and local Ray.

One session-scoped run of every stage on the generated sample dataset feeds the checks
below (stats tables, artifacts and checksums, model provenance, cached re-run, config
change invalidation, CLI commands). The run uses the same code path as
``talkforge run``: CLI → Prefect pipeline flow → stage subflows → shard tasks → Ray pool.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metrics.registry import METRICS, Setting
from storage.catalog import Catalog
from storage.store import ArtifactRef, ArtifactStore
from talkforge.cli import app
from talkforge.stages import STAGE_ORDER
from tests.conftest import CONFIG, REPO, invoke, sets

pytestmark = pytest.mark.slow


def copy_catalog(root: Path, tmp_path: Path) -> Path:
    """A copy of a run's catalog and models; artifacts stay in (and are read from) the
    original store, which the copy's runs must name with ``project.store_uri``."""
    dst = tmp_path / "copy"
    shutil.copytree(root, dst, ignore=shutil.ignore_patterns("store"))
    return dst


def q(root: Path, sql: str) -> list[dict]:
    return Catalog(root / "catalog").query(sql).to_pylist()


def test_every_stage_produced_current_results(pipeline_root: Path) -> None:
    rows = q(
        pipeline_root,
        "SELECT stage, status, count(*) AS n FROM current_items GROUP BY stage, status",
    )
    done = {r["stage"]: r["n"] for r in rows if r["status"] == "done"}
    assert set(done) == set(STAGE_ORDER), rows
    assert done["download"] == 6
    assert done["engram"] == 1 and done["train"] == 1
    assert done["generate"] == done["evaluate"] >= 1
    assert not [r for r in rows if r["status"] == "failed"]


def test_clips_are_normalized_to_25fps_16k_mono(pipeline_root: Path) -> None:
    clips = q(pipeline_root, "SELECT * FROM current_clips")
    assert len(clips) == 6
    for c in clips:
        assert c["fps"] == 25.0
        assert c["audio_sample_rate_hz"] == 16000 and c["audio_channels"] == 1
        assert abs(c["num_frames"] - c["duration_s"] * 25) <= 1
        assert 4.0 <= c["duration_s"] <= 8.0


def test_quality_rules_store_value_threshold_and_reason(pipeline_root: Path) -> None:
    rules = q(pipeline_root, "SELECT rule, value, threshold, passed, reason FROM current_quality")
    names = {r["rule"] for r in rules}
    assert {"duration", "face_size", "multi_face", "blur"} <= names, names
    assert all(r["value"] is not None and r["threshold"] is not None for r in rules)
    assert all(r["reason"] for r in rules if not r["passed"])


def test_features_are_aligned_and_labelled_random_init(pipeline_root: Path) -> None:
    feats = q(
        pipeline_root,
        "SELECT f.*, c.num_frames AS clip_frames FROM current_features f "
        "JOIN current_clips c USING (item_id)",
    )
    assert {f["family"] for f in feats} == {
        "vae_latents", "hubert", "liveportrait_motion", "emoca_flame", "reference", "sensevoice"
    }  # fmt: skip
    for f in feats:
        shape = [int(d) for d in f["shape"].split("x")]
        assert f["model_origin"] == "random-init"
        if f["family"] == "reference":  # one set per clip: 16 x 16 patch tokens
            assert shape[0] == 256
            continue
        if f["family"] == "sensevoice":  # two 60 ms steps per three 40 ms frames
            assert abs(shape[0] - f["clip_frames"] * 2 / 3) <= 2
            continue
        assert shape[0] == f["clip_frames"]
        if f["family"] == "hubert":
            assert shape[1] == 2  # two 50 Hz steps per 25 fps frame
        elif f["family"] == "vae_latents":
            assert shape[1] == 16 and f["dtype"] == "float16"  # Flux.1 latent layout
        else:
            assert shape[1] == {"liveportrait_motion": 133, "emoca_flame": 159}[f["family"]]
    speech = q(pipeline_root, "SELECT * FROM current_speech")
    assert len(speech) == len({f["item_id"] for f in feats})
    assert {s["model_origin"] for s in speech} == {"random-init"}


def test_every_current_artifact_exists_with_a_valid_checksum(pipeline_root: Path) -> None:
    arts = q(
        pipeline_root,
        "SELECT artifact_id, kind, name, uri, size_bytes, sha256 FROM current_artifacts",
    )
    kinds = {a["kind"] for a in arts}
    assert {"video", "audio", "checkpoint"} <= kinds, kinds
    store = ArtifactStore(str(pipeline_root / "store"))
    for a in arts:
        assert store.verify(ArtifactRef(**a)), a["uri"]
    tmp_left = list((pipeline_root / "store").rglob(".tmp-*"))
    assert not tmp_left


def test_evaluation_table_both_settings_and_training_history(pipeline_root: Path) -> None:
    rows = q(pipeline_root, "SELECT * FROM current_eval_summary")
    table = {(r["family"], r["setting"], r["metric"]): r for r in rows}
    families = {r["family"] for r in rows} - {"ground_truth"}
    assert {r["setting"] for r in rows} == {"self", "cross"} and len(families) == 1
    (family,) = families
    for setting in ("self", "cross"):
        want = {m.name for m in METRICS.values() if Setting(setting) in m.settings}
        for who in (family, "ground_truth"):
            got = {m for (f, s, m) in table if f == who and s == setting}
            assert want <= {m.split("_at_")[0] for m in got}, (who, setting, want - got)
    assert {r["model_origin"] for r in rows} == {"random-init"}
    gen = {m: r["value"] for (f, s, m), r in table.items() if f == family and s == "self"}
    gt = {m: r["value"] for (f, s, m), r in table.items() if f == "ground_truth" and s == "self"}
    assert 0 < gen["psnr_db"] < 100 and -1 <= gen["ssim"] <= 1 and gen["fid"] > 0
    assert gt["psnr_db"] == 100.0 and gt["fid"] == pytest.approx(0, abs=1e-6)
    assert gt["csim"] == pytest.approx(1.0) and gt["ssim"] == pytest.approx(1.0)
    assert table[("ground_truth", "cross", "fid")]["value"] == pytest.approx(0, abs=1e-6)
    # the split is recorded: the held-out clips are exactly one speaker's, and they alone
    # were generated
    split = q(pipeline_root, "SELECT * FROM current_split")
    held = {r["clip_id"] for r in split if r["side"] == "heldout"}
    assert len({r["group_key"] for r in split if r["side"] == "heldout"}) == 1 and held
    generated = q(pipeline_root, "SELECT item_id FROM current_items WHERE stage = 'generate'")
    assert {r["item_id"] for r in generated} <= held
    dashboard = q(pipeline_root, (REPO / "dashboards" / "06_eval_metrics.sql").read_text())
    assert {r["setting"] for r in dashboard} == {"self", "cross"}
    assert all(r["ground_truth"] is not None for r in dashboard if r["metric"] == "fid")
    steps = q(pipeline_root, "SELECT step, loss FROM current_train_metrics ORDER BY step")
    assert steps and all(s["loss"] == s["loss"] for s in steps)  # no NaN


def test_cached_rerun_skips_everything(
    pipeline_root: Path, sample_dir: Path, tmp_path: Path
) -> None:
    root = copy_catalog(pipeline_root, tmp_path)
    invoke(
        "run",
        "--config",
        CONFIG,
        *sets(root, sample_dir),
        "--set",
        f"project.store_uri={pipeline_root / 'store'}",
    )
    run = q(root, "SELECT run_id FROM runs WHERE event='started' ORDER BY event_at DESC LIMIT 1")
    run_id = run[0]["run_id"]
    planned = q(root, f"SELECT * FROM stage_runs WHERE run_id = '{run_id}'")
    assert planned
    assert all(p["to_run"] == 0 and p["items"] == p["cached_done"] + p["cached_filtered"]
               for p in planned), planned  # fmt: skip
    # nothing changed version, so the run wrote no per-item plan row
    assert q(root, f"SELECT count(*) AS n FROM plans WHERE run_id = '{run_id}'") == [{"n": 0}]


def test_config_change_reruns_that_stage_and_downstream_only(
    pipeline_root: Path, sample_dir: Path, tmp_path: Path
) -> None:
    root = copy_catalog(pipeline_root, tmp_path)
    store = ["--set", f"project.store_uri={pipeline_root / 'store'}"]
    invoke(
        "run",
        "--config",
        CONFIG,
        *sets(root, sample_dir, "quality.min_blur_laplacian_var=5"),
        *store,
        "--until",
        "features",
    )
    run_id = q(
        root, "SELECT run_id FROM runs WHERE event='started' ORDER BY event_at DESC LIMIT 1"
    )[0]["run_id"]
    planned = {
        r["stage"]: (r["to_run"], r["items"])
        for r in q(root, f"SELECT stage, to_run, items FROM stage_runs WHERE run_id = '{run_id}'")
    }
    assert set(planned) == {"download", "faces", "quality", "features"}
    assert planned["download"][0] == planned["faces"][0] == 0
    assert planned["quality"][0] == planned["quality"][1] > 0
    assert planned["features"][0] == planned["features"][1] > 0
    rows = q(root, f"SELECT DISTINCT stage, action FROM plans WHERE run_id = '{run_id}'")
    assert sorted((r["stage"], r["action"]) for r in rows) == [
        ("features", "run"),
        ("quality", "run"),
    ]
    versions = invoke("versions", "quality", "--config", CONFIG, *sets(root, sample_dir))
    assert versions.count("True") == 1 and "False" in versions


def test_cli_status_sql_failures_lineage(pipeline_root: Path, sample_dir: Path) -> None:
    # read commands find the catalog through the config's data_root
    cfg = pipeline_root / "cfg.yaml"
    cfg.write_text(json.dumps({"project": {"data_root": str(pipeline_root)}}))
    args = ["--config", str(cfg)]
    out = invoke("status", *args)
    for stage in STAGE_ORDER:
        assert stage in out
    out = invoke("sql", "SELECT dataset, clips FROM dataset_summary", *args)
    assert "sample" in out and "6" in out
    result = CliRunner().invoke(app, ["sql", "DELETE FROM items", *args])
    assert result.exit_code == 2 and "SELECT" in result.output
    invoke("failures", *args)
    clip = q(pipeline_root, "SELECT item_id FROM current_items WHERE stage='generate' LIMIT 1")
    out = invoke("lineage", clip[0]["item_id"], *args, "--format", "json")
    stages = {row["stage"] for row in json.loads(out)}
    assert {"download", "faces", "quality", "features", "generate", "evaluate"} <= stages
    art = q(pipeline_root, "SELECT artifact_id FROM current_artifacts WHERE kind='checkpoint'")
    out = invoke("lineage", art[0]["artifact_id"], *args, "--format", "json")
    chain = {row["stage"] for row in json.loads(out)}
    assert {"train", "features", "faces", "download"} <= chain, chain
    out = invoke("report", *args)
    assert "01_pipeline_state" in out


def test_quality_command_counts_removals_per_dataset_and_rule(pipeline_root: Path) -> None:
    cfg = pipeline_root / "cfg.yaml"
    cfg.write_text(json.dumps({"project": {"data_root": str(pipeline_root)}}))
    rows = json.loads(invoke("quality", "--config", str(cfg), "--format", "json"))
    measured = q(pipeline_root, "SELECT rule, passed, hard, value FROM current_quality")
    by_rule = {r["rule"]: r for r in rows}
    assert set(by_rule) == {m["rule"] for m in measured}
    for rule, row in by_rule.items():
        mine = [m for m in measured if m["rule"] == rule]
        failed = sum(not m["passed"] for m in mine)
        assert row["dataset"] == "sample" and row["clips"] == len(mine) == 6
        assert row["failed"] == failed
        assert row["removed"] == (failed if row["hard"] else 0)
        assert row["removed_only_here"] <= row["removed"]
        assert row["min"] <= row["p50"] <= row["max"]
        expected = {0: "fails no clip", len(mine): "fails EVERY clip"}.get(failed, "")
        assert row["attention"] == expected
    hist = json.loads(
        invoke("quality", "--config", str(cfg), "--histogram", "blur", "--bins", "4",
               "--format", "json")
    )  # fmt: skip
    assert sum(h["clips"] for h in hist) == 6 and len(hist) == 4
