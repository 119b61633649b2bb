"""Planning in SQL: keys byte-identical to :func:`tasks.base.stable_hash`, candidates of a
stage that filters and pairs items, and plans that list only what changed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from storage.catalog import Catalog
from talkforge.candidates import Candidates, plan_candidates
from talkforge.plan import RunOptions, StagePlan
from talkforge.planner import decide
from tasks.base import ItemInputs, Stage, StageEnv, stable_hash

COMMON = {"stage": "probe", "code_version": "2", "config_hash": "c0ffee", "models": {"m": "ab"}}


def _plan(tmp_path: Path, stage: str = "probe") -> StagePlan:
    env = StageEnv(data_root=str(tmp_path), store_uri=str(tmp_path / "store"), run_id="r")
    return StagePlan(run_id="r", stage=stage, env=env)


def test_sql_keys_equal_stable_hash_also_for_values_json_must_escape(tmp_path: Path) -> None:
    values = ["ab12", 'quo"te', "back\\slash", "na\u00efve", "tab\tbed", "\u2603", None]
    ids = [f"i{n}" for n in range(len(values))]
    table = pa.table(
        {"item_id": ids, "m_0": ["k0"] * len(values), "m_1": pa.array(values, pa.string())}
    )
    built: list[str] = []

    def build(rows: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
        built.extend(i for i, _ in rows)
        return {i: ItemInputs(item_id=i) for i, _ in rows}

    candidates = Candidates(
        build=build,
        sql="SELECT * FROM probe_items ORDER BY item_id",
        tables={"probe_items": table},
        columns=["faces", "faces@partner"],
        constants={"engram": "e1", "zz": 'c"onst'},
    )
    plan = _plan(tmp_path)
    decide(Catalog(tmp_path / "cat"), candidates, plan, COMMON, [], RunOptions(), 3)
    expected = {
        i: stable_hash(
            {
                **COMMON,
                "inputs": {
                    "faces": "k0",
                    **({"faces@partner": v} if v is not None else {}),
                    "engram": "e1",
                    "zz": 'c"onst',
                },
            }
        )
        for i, v in zip(ids, values, strict=True)
    }
    assert {i.item_id: i.item_key for i in plan.items} == expected
    assert {i.action for i in plan.items} == {"run"} and not built  # inputs: when executed
    assert set(plan.inputs_for(plan.items)) == set(ids) and built == ids
    assert plan.items[-1].input_keys == {"faces": "k0", "engram": "e1", "zz": 'c"onst'}


def _commit_done(catalog: Catalog, stage: str, keys: dict[str, str], at: datetime) -> None:
    """A stage's current done items, as a finished run leaves them (plan rows + items)."""
    base = {"run_id": "r0", "stage": stage}
    catalog.append_many(
        {
            "plans": [
                {**base, "item_id": i, "item_key": k, "action": "run", "planned_at": at}
                for i, k in keys.items()
            ],
            "items": [
                {**base, "item_id": i, "item_key": k, "status": "done", "created_at": at}
                for i, k in keys.items()
            ],
        }
    )


class Pairing(Stage[Any]):
    """Reads faces and quality of an item, and quality of its partner."""

    name = "pairing"
    code_version = "1"
    requires: ClassVar[tuple[str, ...]] = ("faces", "quality")
    partner_inputs: ClassVar[tuple[str, ...]] = ("quality",)

    def accepts(self, item_id: str, shared: dict[str, Any]) -> bool:
        return item_id != "c2"

    def partners(self, item_ids: list[str]) -> dict[str, str]:
        return {item_ids[0]: item_ids[-1]}

    def process(self, inputs: Any, ctx: Any) -> Any:
        raise NotImplementedError


def test_candidates_intersect_filter_and_pair_in_sql(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "cat")
    at = datetime(2026, 1, 1, tzinfo=UTC)
    _commit_done(catalog, "faces", {f"c{n}": f"f{n}" for n in range(1, 5)}, at)
    _commit_done(catalog, "quality", {f"c{n}": f"q{n}" for n in range(1, 4)}, at)
    plan = _plan(tmp_path, "pairing")
    candidates = plan_candidates(catalog, Pairing, None, plan.env, plan, RunOptions())
    rows = catalog.query(candidates.sql, candidates.params, candidates.tables).to_pylist()
    # c2 refused by accepts, c4 has no quality output; c1's partner is c3
    assert [candidates.material(r) for r in rows] == [
        {"faces": "f1", "quality": "q1", "quality@partner": "q3"},
        {"faces": "f3", "quality": "q3"},
    ]
    assert [r["item_id"] for r in rows] == ["c1", "c3"]


def test_a_plan_lists_what_changed_and_current_follows_the_newest_rows(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "cat")
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    keys = {f"c{n}": f"k{n}" for n in range(4)}
    _commit_done(catalog, "probe", keys, t0)
    catalog.append(
        "stage_runs",
        [{"run_id": "r0", "stage": "probe", "planned_at": t0, "complete": True, "lists_all": True}],
    )
    # a later plan that changed one key and dropped another lists only those two
    catalog.append_many(
        {
            "plans": [
                {"run_id": "r1", "stage": "probe", "item_id": i, "item_key": k, "action": a}
                | {"planned_at": t0 + timedelta(hours=1)}
                for i, k, a in (("c1", "k1-new", "run"), ("c3", "", "dropped"))
            ],
            "stage_runs": [
                {"run_id": "r1", "stage": "probe", "planned_at": t0 + timedelta(hours=1)}
                | {"complete": True, "lists_all": False}
            ],
        }
    )
    current = catalog.query(
        "SELECT item_id, item_key FROM current_plans WHERE item_key <> '' ORDER BY item_id"
    ).to_pylist()
    assert current == [
        {"item_id": "c0", "item_key": "k0"},
        {"item_id": "c1", "item_key": "k1-new"},
        {"item_id": "c2", "item_key": "k2"},
    ]
    done = catalog.query("SELECT item_id FROM current_items ORDER BY item_id").to_pylist()
    assert [r["item_id"] for r in done] == ["c0", "c2"]  # c1's new version has no result yet
