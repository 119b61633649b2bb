"""Train / held-out split by speaker or source video: no group on both sides, stable when
clips are added, MuseTalk's HDTF validation list, recorded in the catalog, and a split that
holds out nothing said at planning time."""

from __future__ import annotations

import pytest

from storage.catalog import Catalog
from talkforge.config import PipelineConfig, SplitConfig
from talkforge.engine import Engine
from talkforge.manifests import record_manifests
from talkforge.plan import RunOptions
from talkforge.split_planner import SplitPlanner
from tasks.base import SourceManifest, StageEnv
from tasks.records import SourceClip
from tasks.split import (
    MUSETALK_HDTF_VAL,
    SplitClip,
    group_of,
    hdtf_video,
    heldout_score,
    is_heldout,
    plan_split,
)


def _clips(speakers: int, videos: int, clips: int, start: int = 0) -> list[SplitClip]:
    """``speakers`` people × ``videos`` source videos each × ``clips`` clips per video."""
    return [
        SplitClip(clip_id=f"d-s{s}v{v}_{c}", dataset="d", source_id=f"yt{s}x{v}",
                  speaker=f"p{s}")
        for s in range(start, start + speakers) for v in range(videos) for c in range(clips)
    ]  # fmt: skip


def _sides(clips: list[SplitClip], plan, key) -> dict[str, set[bool]]:
    held = plan.heldout_ids
    out: dict[str, set[bool]] = {}
    for c in clips:
        out.setdefault(key(c), set()).add(c.clip_id in held)
    return out


@pytest.mark.parametrize("group_by", ["speaker", "source_video"])
def test_no_speaker_or_source_video_on_both_sides(group_by):
    clips = _clips(30, 3, 4)
    plan = plan_split(clips, holdout_fraction=0.3, seed=1, group_by=group_by)
    assert all(len(s) == 1 for s in _sides(clips, plan, lambda c: c.source_id).values())
    if group_by == "speaker":
        assert all(len(s) == 1 for s in _sides(clips, plan, lambda c: c.speaker).values())
    else:  # videos of one speaker may land on both sides, but never one video
        assert any(len(s) == 2 for s in _sides(clips, plan, lambda c: c.speaker).values())
    c = plan.counts()
    assert 0 < c["heldout_clips"] < c["clips"] == 360 and not plan.problem()
    # clip ids never decide: renaming every clip keeps every side
    renamed = [SplitClip(f"z{i}", c.dataset, c.source_id, c.speaker) for i, c in enumerate(clips)]
    again = plan_split(renamed, holdout_fraction=0.3, seed=1, group_by=group_by)
    assert [r.clip_id in again.heldout_ids for r in renamed] == [
        c.clip_id in plan.heldout_ids for c in clips
    ]


def test_deterministic_and_stable_when_clips_are_added():
    clips = _clips(20, 2, 3)
    plan = plan_split(clips, holdout_fraction=0.34, seed=3)
    assert plan.heldout_ids == plan_split(list(reversed(clips)), holdout_fraction=0.34,
                                          seed=3).heldout_ids  # fmt: skip
    # new clips of known speakers and of new speakers: no existing clip changes side
    more = clips + _clips(20, 1, 2, start=0)[::7] + _clips(10, 2, 2, start=100)
    more = list({c.clip_id: c for c in more}.values())
    grown = plan_split(more, holdout_fraction=0.34, seed=3)
    assert {c.clip_id for c in clips} & grown.heldout_ids == plan.heldout_ids
    assert plan.split_hash != grown.split_hash
    # a different seed is a different split
    assert plan_split(clips, holdout_fraction=0.34, seed=4).heldout_ids != plan.heldout_ids


def test_speaker_falls_back_to_the_source_video():
    c = SplitClip(clip_id="x", dataset="celebvhq", source_id="abc", speaker="")
    assert group_of(c, "speaker") == "celebvhq/video/abc"
    assert group_of(SplitClip("y", "hdtf", "abc", "Obama"), "speaker") == "hdtf/speaker/Obama"
    assert group_of(SplitClip("y", "hdtf", "abc", "Obama"), "source_video") == "hdtf/video/abc"


def _hdtf(subset: str, name: str, k: int, speaker: str) -> SplitClip:
    return SplitClip(f"hdtf-{subset}-{name}_{k}", "hdtf", f"yt{name}", speaker, subset)


def test_musetalk_hdtf_validation_videos_are_the_test_split():
    assert len(MUSETALK_HDTF_VAL) == 20
    clips = [
        _hdtf("RD", "Radio7", 0, "Radio7"),
        _hdtf("RD", "Radio7", 1, "Radio7"),
        _hdtf("RD", "Radio10", 0, "Radio10"),
        _hdtf("WDA", "XavierBecerra", 0, "XavierBecerra"),
        _hdtf("WDA", "VeronicaEscobar0", 0, "VeronicaEscobar"),
        _hdtf("WDA", "VeronicaEscobar2", 0, "VeronicaEscobar"),  # same speaker, not listed
        _hdtf("WRA", "SteveScalise1", 3, "SteveScalise"),
        _hdtf("WRA", "SteveScalise2", 0, "SteveScalise"),
        _hdtf("WRA", "MarcoRubio", 0, "MarcoRubio"),
        SplitClip("other-x_0", "other", "q", "someone"),
    ]
    assert hdtf_video(clips[3]) == "WDA_XavierBecerra" and hdtf_video(clips[-1]) is None
    by_speaker = plan_split(clips, holdout_fraction=0.0, seed=0, rule="musetalk_hdtf_val")
    held = {c.clip_id for c in clips if c.clip_id in by_speaker.heldout_ids}
    assert held == {c.clip_id for c in clips[:2] + clips[3:8]}
    by_video = plan_split(
        clips, holdout_fraction=0.0, seed=0, group_by="source_video", rule="musetalk_hdtf_val"
    )
    assert by_video.heldout_ids == {c.clip_id for c in clips[:2] + clips[3:5] + clips[6:7]}
    assert "musetalk_hdtf_val" in by_video.rule


def test_is_heldout_reads_the_planned_split_else_each_clip_is_its_own_group():
    env = StageEnv(data_root="/x", store_uri="/x/s", run_id="r", holdout_fraction=0.5)
    ids = [f"c{i}" for i in range(40)]
    assert [is_heldout(i, env) for i in ids] == [heldout_score(i, 0) < 0.5 for i in ids]
    planned = env.model_copy(update={"heldout_ids": frozenset({"c1", "c7"})})
    assert [i for i in ids if is_heldout(i, planned)] == ["c1", "c7"]


def _ingest(catalog: Catalog, speakers: list[str], run_id: str = "r0") -> None:
    records = [
        SourceClip(dataset="sample", subset="RD", source_id=f"yt{s}", clip_id=f"sample-RD-{s}_{k}",
                   url=f"https://example.invalid/{s}", start_s=0.0, end_s=5.0, speaker=s)
        for s in speakers for k in range(2)
    ]  # fmt: skip
    manifest = SourceManifest(
        dataset="sample", kind="hdtf", licence="test", metadata_files=[],
        metadata_sha256="x" * 64, records=records,
    )  # fmt: skip
    record_manifests(catalog, [manifest], run_id)


def test_the_split_is_recorded_when_it_changes(tmp_path):
    catalog = Catalog(tmp_path / "catalog")
    _ingest(catalog, ["A", "B", "C", "D", "E", "F"])
    planner = SplitPlanner(catalog, SplitConfig(holdout_fraction=0.5, seed=2))
    planner.record("r1")
    rows = catalog.query("SELECT * FROM current_split ORDER BY clip_id").to_pylist()
    assert len(rows) == 12 and {r["run_id"] for r in rows} == {"r1"}
    held = {r["clip_id"] for r in rows if r["side"] == "heldout"}
    assert held == planner.heldout_ids("r1") and 0 < len(held) < 12
    assert all(r["group_key"] == f"sample/speaker/{r['clip_id'][10]}" for r in rows)
    SplitPlanner(catalog, SplitConfig(holdout_fraction=0.5, seed=2)).record("r2")  # unchanged
    assert catalog.query("SELECT count(*) AS n FROM splits").to_pylist()[0]["n"] == 12
    SplitPlanner(catalog, SplitConfig(holdout_fraction=0.5, seed=5)).record("r3")
    latest = catalog.query("SELECT DISTINCT run_id FROM current_split").to_pylist()
    assert latest == [{"run_id": "r3"}]


def test_a_split_that_holds_out_nothing_says_so_at_planning_time(tmp_path):
    seed = next(s for s in range(100) if heldout_score("sample/speaker/A", s) >= 0.34)
    cfg = PipelineConfig.model_validate(
        {"project": {"data_root": str(tmp_path)}, "split": {"seed": seed}}
    )
    engine = Engine(cfg)
    try:
        _ingest(engine.catalog, ["A"])
        plan = engine.plan("run1", "generate", RunOptions())
        assert "split holds out no clip" in plan.blocked_reason
        assert "1 source group(s)" in plan.blocked_reason
        assert engine.stage_env("run1", "train").heldout_ids == frozenset()
        assert engine.stage_env("run1", "faces").heldout_ids is None  # not a split stage
    finally:
        engine.close()
