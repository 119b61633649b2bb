"""Executors: models load once per worker, bad items fail alone, dead workers are replaced."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import pytest

from talkforge.config import ExecutionConfig, RayConfig
from talkforge.executors import LocalExecutor, RayExecutor
from talkforge.ray_pools import PoolStartTimeout
from tasks.base import (
    FailureKind,
    ItemContext,
    ItemFailure,
    ItemInputs,
    Record,
    Stage,
    StageConfig,
    StageEnv,
)
from tasks.runner import Outcome, WorkItem


class ToyConfig(StageConfig):
    die_marker: str = ""


class ToyRecord(Record):
    item_id: str
    pid: int
    setups: int


class ToyStage(Stage[ToyConfig]):
    """Doubles nothing: records which process served the item and how often it set up."""

    name: ClassVar[str] = "toy"
    code_version: ClassVar[str] = "1"
    config_type = ToyConfig

    def setup(self) -> None:
        self.setups = getattr(self, "setups", 0) + 1

    def process(self, inputs: ItemInputs, ctx: ItemContext) -> Record:
        if inputs.item_id == "bad":
            raise ItemFailure(FailureKind.FORMAT, "bad input")
        if inputs.item_id == "bug":
            raise ZeroDivisionError("division by zero")
        marker = Path(self.config.die_marker) if self.config.die_marker else None
        if inputs.item_id == "die" and marker and not marker.exists():
            marker.write_text("died once")
            os._exit(1)  # the worker process dies mid-item
        return ToyRecord(item_id=inputs.item_id, pid=os.getpid(), setups=self.setups)


def work(ids: list[str]) -> list[WorkItem]:
    return [
        WorkItem(item_id=i, item_key=f"k-{i}", attempt=1, inputs=ItemInputs(item_id=i)) for i in ids
    ]


def env(tmp_path: Path) -> StageEnv:
    return StageEnv(data_root=str(tmp_path), store_uri=str(tmp_path / "store"), run_id="t")


def collect(
    executor: LocalExecutor | RayExecutor, cfg: ToyConfig, tmp_path: Path, ids: list[str]
) -> dict[str, Outcome]:
    out: dict[str, Outcome] = {}
    executor.run(ToyStage, cfg, env(tmp_path), work(ids), lambda o: out.__setitem__(o.item_id, o))
    return out


def test_local_executor_sets_up_once_and_isolates_failures(tmp_path: Path) -> None:
    out = collect(LocalExecutor(), ToyConfig(), tmp_path, ["a", "bad", "b", "bug", "c"])
    assert {k: o.status for k, o in out.items()} == {
        "a": "done",
        "bad": "failed",
        "b": "done",
        "bug": "failed",
        "c": "done",
    }
    assert out["bad"].error_kind == "format" and not out["bad"].retryable
    assert out["bug"].error_kind == "internal" and out["bug"].retryable
    assert "ZeroDivisionError" in out["bug"].error_message
    setups = {
        ToyRecord.model_validate_json(o.record_json).setups
        for o in out.values()
        if o.status == "done"
    }
    assert setups == {1}


@pytest.mark.usefixtures("ray_session")
def test_ray_pool_loads_once_per_actor_and_uses_every_actor(tmp_path: Path) -> None:
    cfg = ToyConfig(resources={"num_cpus": 1, "num_workers": 2})
    executor = RayExecutor(RayConfig(), ExecutionConfig())
    try:
        ids = [f"c{i}" for i in range(12)]
        out = collect(executor, cfg, tmp_path, ids)
        records = [ToyRecord.model_validate_json(o.record_json) for o in out.values()]
        assert len(records) == 12 and {r.setups for r in records} == {1}
        assert len({r.pid for r in records}) == 2
        workers = executor.describe_workers("toy")
        assert [w["setup_calls"] for w in workers] == [1, 1]
        # as many items as workers: one each, never two queued on one while another idles
        few = collect(executor, cfg, tmp_path, ["x", "y"])
        pids = {ToyRecord.model_validate_json(o.record_json).pid for o in few.values()}
        assert len(pids) == 2
    finally:
        executor.release("toy")


@pytest.mark.usefixtures("ray_session")
def test_a_dead_actor_is_replaced_and_its_item_retried(tmp_path: Path) -> None:
    cfg = ToyConfig(die_marker=str(tmp_path / "died"), resources={"num_workers": 1})
    executor = RayExecutor(RayConfig(), ExecutionConfig(actor_restarts=2))
    try:
        out = collect(executor, cfg, tmp_path, ["a", "die", "b"])
    finally:
        executor.release("toy")
    assert (tmp_path / "died").exists()
    assert {k: o.status for k, o in out.items()} == {"a": "done", "die": "done", "b": "done"}


@pytest.mark.usefixtures("ray_session")
def test_on_a_cluster_a_pool_that_cannot_be_placed_fails_with_asked_and_available(
    tmp_path: Path,
) -> None:
    """``address`` set: no up-front fit check (a cluster may autoscale), but a bounded wait."""
    cfg = ToyConfig(resources={"num_cpus": 1, "num_gpus": 1, "num_workers": 2})
    executor = RayExecutor(RayConfig(address="auto", start_timeout_s=3), ExecutionConfig())
    try:
        with pytest.raises(PoolStartTimeout) as err:
            collect(executor, cfg, tmp_path, ["a"])
    finally:
        executor.release("toy")
    message = str(err.value)
    assert "toy: 2 of 2 actors not started within 3 s" in message
    assert "2 stage workers × (CPU 1, GPU 1): 0 started" in message
    assert "The cluster has CPU 2, GPU 0" in message
    # the pending actors were removed: a placeable config still runs on the cluster
    executor = RayExecutor(RayConfig(address="auto"), ExecutionConfig())
    try:
        assert collect(executor, ToyConfig(), tmp_path, ["b"])["b"].status == "done"
    finally:
        executor.release("toy")
