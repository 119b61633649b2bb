"""Planning and status at scale, without executing anything: a constant number of catalog
queries per plan, unchanged manifests not parsed again, a run's status as that run left it
(and equal through time travel), and the dry run's reasons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from talkforge import ops
from talkforge.config import load_config
from talkforge.engine import Engine
from talkforge.plan import RunOptions, StageSummary, key_hasher
from talkforge.plan_report import dry_run
from tasks.base import stable_hash
from tasks.download.talkvid import read_talkvid
from tasks.runner import Outcome
from tests.catalog_helpers import write_talkvid_manifest

DOWNLOAD = RunOptions(stages=["download"])


def _engine(root: Path, manifest: Path, *extra: str) -> Engine:
    cfg = load_config(
        None,
        [
            f"project.data_root={root}",
            "download.sample.enabled=false",
            f"download.datasets=[{{kind: talkvid, metadata: {manifest}}}]",
            "execution.executor=local",
            *extra,
        ],
    )
    return Engine(cfg)


class Counter:
    """Counts the catalog calls an engine makes (queries and commits)."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        cat = engine.catalog
        for name in ("query", "read", "append", "append_many"):
            original = getattr(cat, name)

            def wrapped(*args: Any, _name: str = name, _fn: Any = original, **kw: Any) -> Any:
                self.calls.append(_name)
                return _fn(*args, **kw)

            monkeypatch.setattr(cat, name, wrapped)


def _plan(engine: Engine, run_id: str) -> Any:
    plan = engine.plan(run_id, "download", DOWNLOAD)
    engine.summarize(plan, StageSummary("download"))
    return plan


def _finish(engine: Engine, plan: Any, ids: list[str], status: str = "done") -> None:
    """Commit outcomes for ``ids`` through the engine's own commit path."""
    by_id = {i.item_id: i for i in plan.items}
    engine._commit(
        plan,
        by_id,
        [
            Outcome(
                item_id=i,
                item_key=by_id[i].item_key,
                attempt=1,
                status=status,
                error_kind="network" if status == "failed" else "",
                retryable=False,
            )
            for i in ids
        ],
    )


def test_key_hasher_equals_stable_hash() -> None:
    common = {"stage": "faces", "code_version": "3", "config_hash": "ab", "models": {"m": "x"}}
    for keys in ({"source": "h"}, {"items": {"c": {"download": "k"}}}, None, "s"):
        assert key_hasher(common)(keys) == stable_hash({**common, "inputs": keys})
    assert key_hasher({})({"a": 1}) == stable_hash({"inputs": {"a": 1}})


def test_a_plan_costs_the_same_number_of_queries_at_any_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts = {}
    for n in (5, 300):
        manifest = write_talkvid_manifest(tmp_path / f"m{n}.json", n)
        engine = _engine(tmp_path / f"data{n}", manifest)
        first = _plan(engine, "r1")
        assert len(first.to_run) == n
        _finish(engine, first, [i.item_id for i in first.items])
        counter = Counter(engine, monkeypatch)
        again = _plan(engine, "r2")
        assert again.counts == {"cached": n} and not again.items  # nothing listed
        counts[n] = list(counter.calls)
        engine.close()
    assert counts[5] == counts[300]
    assert len(counts[300]) <= 12, counts[300]


def test_an_unchanged_manifest_is_not_parsed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_talkvid_manifest(tmp_path / "m.json", 40)
    engine = _engine(tmp_path / "data", manifest)
    first = _plan(engine, "r1")
    first_id = first.to_run[0].item_id
    import tasks.download.datasets as datasets

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("an unchanged manifest was parsed again")

    monkeypatch.setattr(datasets, "_read", refuse)
    again = _plan(engine, "r2")
    assert [(i.item_id, i.item_key) for i in again.items] == [
        (i.item_id, i.item_key) for i in first.items
    ]
    # the stored record is what runs: equal to the parsed one, built only when asked
    (parsed,) = [c for c in read_talkvid(manifest).clips if c.clip_id == first_id]
    assert again.inputs_for(again.to_run[:1])[first_id].source == parsed
    monkeypatch.undo()
    write_talkvid_manifest(manifest, 41)  # a new release: one more clip
    third = _plan(engine, "r3")
    assert third.total == 41 and len(third.to_run) == 41
    ingests = engine.catalog.query("SELECT count(*) AS n FROM datasets").to_pylist()
    assert ingests == [{"n": 2}]
    engine.close()


def test_status_is_how_the_run_left_it_also_through_time_travel(tmp_path: Path) -> None:
    manifest = write_talkvid_manifest(tmp_path / "m.json", 10)
    engine = _engine(tmp_path / "data", manifest)
    engine.start_run("test", DOWNLOAD, run_id="run-a")
    plan_a = _plan(engine, "run-a")
    ids = [i.item_id for i in plan_a.items]
    _finish(engine, plan_a, ids[:4])
    _finish(engine, plan_a, ids[4:5], "failed")
    _finish(engine, plan_a, ids[5:6], "filtered")
    engine.finish_run("run-a", "interrupted", DOWNLOAD)
    status_a = ops.stage_status(engine.catalog, "run-a")
    assert status_a == [
        {
            "stage": "download",
            "items": 10,
            "done": 4,
            "filtered": 1,
            "failed": 1,
            "pending": 4,
            "skipped": 0,
            "dropped": 0,
        }
    ]
    current_a = engine.catalog.query("SELECT * FROM current_items ORDER BY item_id").to_pylist()

    engine.start_run("test", DOWNLOAD, run_id="run-b")
    plan_b = _plan(engine, "run-b")
    assert len(plan_b.to_run) == 4  # cached: 4 done + 1 filtered; skipped: 1 failed
    _finish(engine, plan_b, [i.item_id for i in plan_b.to_run])
    engine.finish_run("run-b", "finished", DOWNLOAD)
    assert ops.stage_status(engine.catalog, "run-a") == status_a  # later runs change nothing
    status_b = ops.stage_status(engine.catalog, "run-b")[0]
    assert (status_b["done"], status_b["pending"], status_b["skipped"]) == (8, 0, 6)

    then = engine.catalog.as_of("run-a")
    assert ops.stage_status(then, "run-a") == status_a
    assert then.query("SELECT * FROM current_items ORDER BY item_id").to_pylist() == current_a
    assert ops.stage_status(then, "run-b") == []  # run-b did not exist yet
    engine.close()


def test_dry_run_names_the_changed_config_key(tmp_path: Path) -> None:
    manifest = write_talkvid_manifest(tmp_path / "m.json", 6)
    engine = _engine(tmp_path / "data", manifest)
    engine.start_run("test", DOWNLOAD, run_id="r1")
    first = _plan(engine, "r1")
    _finish(engine, first, [i.item_id for i in first.items])
    engine.close()
    snapshot = engine.catalog.current_snapshot()
    assert dry_run(engine, DOWNLOAD)[0] | {"why": ""} == {
        "stage": "download",
        "items": 6,
        "cached": 6,
        "would_run": 0,
        "retried": 0,
        "skipped_failed": 0,
        "dropped": 0,
        "why": "",
    }
    changed = _engine(tmp_path / "data", manifest, "download.crf=20")
    row = dry_run(changed, DOWNLOAD)[0]
    assert (row["would_run"], row["why"]) == (6, "6 config download.crf")
    assert changed.catalog.current_snapshot() == snapshot  # a dry run commits nothing


def test_clips_gone_from_the_manifest_are_dropped_from_the_current_view(tmp_path: Path) -> None:
    manifest = write_talkvid_manifest(tmp_path / "m.json", 10)
    engine = _engine(tmp_path / "data", manifest)
    first = _plan(engine, "r1")
    _finish(engine, first, [i.item_id for i in first.items])
    write_talkvid_manifest(manifest, 8)  # the same first 8 records, two gone
    again = _plan(engine, "r2")
    gone = sorted(
        i.item_id for i in first.items if i.item_id.endswith(("scene8-scene1", "scene9-scene1"))
    )
    assert again.dropped == gone and len(gone) == 2
    assert again.counts == {"cached": 8} and not again.items
    current = engine.catalog.query("SELECT count(*) AS n FROM current_items").to_pylist()
    assert current == [{"n": 8}]
    assert _plan(engine, "r3").dropped == []  # dropped once, not again
    engine.close()


def test_plans_list_only_changes_and_going_back_to_a_config_finds_its_results(
    tmp_path: Path,
) -> None:
    manifest = write_talkvid_manifest(tmp_path / "m.json", 6)
    engine = _engine(tmp_path / "data", manifest)
    cat = engine.catalog

    def written(run_id: str) -> list[dict[str, Any]]:
        return cat.query(
            "SELECT p.action, count(*) AS n, any_value(s.lists_all) AS lists_all FROM plans p "
            "JOIN stage_runs s USING (run_id, stage) WHERE run_id = ? GROUP BY ALL",
            [run_id],
        ).to_pylist()

    def current() -> int:
        return cat.query("SELECT count(*) AS n FROM current_items").to_pylist()[0]["n"]

    first = _plan(engine, "r1")
    _finish(engine, first, [i.item_id for i in first.items])
    assert written("r1") == [{"action": "run", "n": 6, "lists_all": True}] and current() == 6
    assert _plan(engine, "r2").counts == {"cached": 6}
    assert written("r2") == [] and current() == 6  # nothing changed: no plan rows
    assert cat.query("SELECT items, cached_done FROM stage_runs WHERE run_id = 'r2'").to_pylist()[
        0
    ] == {"items": 6, "cached_done": 6}
    engine.close()

    changed = _engine(tmp_path / "data", manifest, "download.crf=20")
    assert len(_plan(changed, "r3").to_run) == 6
    assert written("r3") == [{"action": "run", "n": 6, "lists_all": True}] and current() == 0
    changed.close()
    back = _engine(tmp_path / "data", manifest)
    again = _plan(back, "r4")
    assert again.counts == {"cached": 6} and len(again.items) == 6  # listed: new current keys
    assert written("r4") == [{"action": "cached", "n": 6, "lists_all": True}] and current() == 6
    back.close()


def test_the_same_plan_again_is_reused_until_an_item_row_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import talkforge.planner as planner

    manifest = write_talkvid_manifest(tmp_path / "m.json", 8)
    engine = _engine(tmp_path / "data", manifest)
    first = _plan(engine, "r1")
    ids = [i.item_id for i in first.items]
    _finish(engine, first, ids[:7])
    _finish(engine, first, ids[7:], "failed")  # permanent: skipped from now on
    decided: list[str] = []
    real = planner._decide

    def spy(*args: Any, **kwargs: Any) -> Any:
        decided.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(planner, "_decide", spy)
    counts = {"cached": 7, "skip_failed": 1}
    assert _plan(engine, "r2").counts == counts and len(decided) == 1  # r1 had items to run
    again = _plan(engine, "r3")
    assert again.counts == counts and not again.items and len(decided) == 1  # r2 reused
    assert ops.stage_status(engine.catalog, "r3") == ops.stage_status(engine.catalog, "r2")
    assert len(_plan(engine, "r4").counts) == 2 and len(decided) == 1
    # any new item row of the stage (here a late result) means the counts may be stale
    _finish(engine, first, ids[7:])
    assert _plan(engine, "r5").counts == {"cached": 8} and len(decided) == 2
    retry = engine.plan("r6", "download", RunOptions(stages=["download"], retry_failed=True))
    engine.summarize(retry, StageSummary("download"))
    assert len(decided) == 3  # other options: another plan
    engine.close()


def test_inputs_are_built_a_block_at_a_time_as_shards_execute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import talkforge.plan as plan_module
    from talkforge.plan import PlannedItem, StagePlan
    from tasks.base import ItemInputs, StageEnv

    monkeypatch.setattr(plan_module, "INPUTS_BLOCK", 4)
    calls: list[list[str]] = []

    def build(rows: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        calls.append([item_id for item_id, _ in rows])
        return {item_id: ItemInputs(item_id=item_id) for item_id, keys in rows if keys["ok"]}

    env = StageEnv(data_root="/tmp", store_uri="/tmp", run_id="r")
    actions = ["run", "cached", "run", "run", "run", "run", "skip_failed", "run", "run"]
    items = [
        PlannedItem(f"i{k}", f"k{k}", action, 1, {"ok": k != 4}) for k, action in enumerate(actions)
    ]
    plan = StagePlan("r", "download", env, items=items, build_inputs=build)
    got: dict[str, Any] = {}
    for shard in plan.shards(2):
        got.update(plan.inputs_for(shard))
    run = [i.item_id for i in plan.to_run]
    assert calls == [run[:4], run[4:]]  # one query per block, never one per shard
    assert sorted(got) == sorted(set(run) - {"i4"})  # what the builder left out stays absent
    assert plan.inputs_for(plan.to_run[:1]) == {"i0": ItemInputs(item_id="i0")}  # asked again
    assert calls[-1] == run[:4] and not plan.inputs_for(items[1:2])  # cached items: nothing


def test_stages_with_nothing_to_do_are_settled_in_one_commit_as_a_plan_would_record_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = write_talkvid_manifest(tmp_path / "m.json", 6)
    engine = _engine(tmp_path / "data", manifest)
    cat = engine.catalog
    first = _plan(engine, "r1")
    _finish(engine, first, [i.item_id for i in first.items])
    assert _plan(engine, "r2").counts == {"cached": 6}  # the normal path, for comparison

    counter = Counter(engine, monkeypatch)
    (settled,) = engine.settle_current("r3", ["download"], DOWNLOAD)
    assert (settled.stage, settled.planned, settled.cached, settled.done) == ("download", 6, 6, 0)
    assert counter.calls.count("append_many") == 1  # one commit, no stage lease taken
    assert cat.query("SELECT count(*) AS n FROM leases WHERE run_id = 'r3'").to_pylist() == [
        {"n": 0}
    ]

    def recorded(run_id: str) -> dict[str, Any]:
        (row,) = cat.query("SELECT * FROM stage_runs WHERE run_id = ?", [run_id]).to_pylist()
        return {k: v for k, v in row.items() if k not in ("run_id", "planned_at")}

    assert recorded("r3") == recorded("r2")
    assert ops.stage_status(cat, "r3") == ops.stage_status(cat, "r2")
    monkeypatch.undo()

    engine.close()

    # going back to a config changes the current version: that is a plan to record, not settle
    changed = _engine(tmp_path / "data", manifest, "download.crf=20")
    _plan(changed, "r4")
    changed.close()
    back = _engine(tmp_path / "data", manifest)
    assert back.settle_current("r5", ["download"], DOWNLOAD) == []
    back_plan = _plan(back, "r6")
    assert back_plan.counts == {"cached": 6} and len(back_plan.items) == 6

    # a stage with something to do ends the settled prefix: later stages are not planned
    planned: list[str] = []
    real = back._decide

    def spy(run_id: str, stage: str, *args: Any, **kwargs: Any) -> Any:
        planned.append(stage)
        return real(run_id, stage, *args, **kwargs)

    monkeypatch.setattr(back, "_decide", spy)
    write_talkvid_manifest(manifest, 7)  # a new clip: download has work, faces must wait
    both = RunOptions(stages=["download", "faces"])
    assert back.settle_current("r7", both.stages, both) == [] and planned == ["download"]
    assert cat.query("SELECT count(*) AS n FROM stage_runs WHERE run_id = 'r7'").to_pylist() == [
        {"n": 0}
    ]
    back.close()
