"""Pages about running the pipeline: runs and their per-stage progress, failures, versions.

Each page takes ``q`` (saved query name → rows) and says so plainly when it has no rows.
"""

from __future__ import annotations

from collections.abc import Callable

import altair as alt
import pandas as pd
import streamlit as st

from talkforge.dashboard.data import fmt, shown

Query = Callable[[str], pd.DataFrame]
WHOLE = alt.Axis(format="d", tickMinStep=1)  # counts: no 0.5 ticks

# how each per-stage count is drawn, in stacking order
PROGRESS_PARTS = {
    "done": "#2e7d32",
    "filtered": "#9e9d24",
    "failed": "#c62828",
    "pending": "#90a4ae",
    "cached": "#cfd8dc",
    "skipped_failed": "#ef9a9a",
}


def duration(seconds: float) -> str:
    """``seconds`` as h/min/s for a person."""
    if seconds != seconds:  # NaN
        return "–"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def nothing(frame: pd.DataFrame, message: str) -> bool:
    """Say ``message`` when ``frame`` is empty; True when it was."""
    if frame.empty:
        st.info(message)
        return True
    return False


def stage_bars(frame: pd.DataFrame, parts: list[str], title: str) -> alt.Chart:
    """A horizontal stacked bar per stage (rows in ``frame`` order) of the ``parts`` counts."""
    long = frame.melt(id_vars=["stage"], value_vars=parts, var_name="part", value_name="items")
    colors = [PROGRESS_PARTS.get(p, "#5c6bc0") for p in parts]
    return (
        alt.Chart(long, title=title)
        .mark_bar()
        .encode(
            y=alt.Y("stage:N", sort=list(frame["stage"]), title=None),
            x=alt.X("items:Q", title="items", axis=WHOLE),
            color=alt.Color("part:N", scale=alt.Scale(domain=parts, range=colors), title=None),
            order=alt.Order("part_order:Q"),
            tooltip=["stage", "part", "items"],
        )
        .transform_calculate(part_order=f"indexof({parts!r}, datum.part)")
    )


def runs_page(q: Query) -> None:
    st.title("Runs")
    runs = q("09_runs")
    if nothing(runs, "No runs recorded yet: start one with `talkforge run` or a deployment."):
        return
    ids = list(runs["run_id"])
    asked = st.query_params.get("run")
    run_id = st.selectbox("Run", ids, index=ids.index(asked) if asked in ids else 0)
    st.query_params["run"] = run_id
    run = runs[runs["run_id"] == run_id].iloc[0]
    state = run["state"] if run["state"] != "started" else "running (or killed: no end yet)"
    progress = q("10_run_progress")
    mine = progress[progress["run_id"] == run_id].drop(columns="run_id")
    cols = st.columns(4)
    cols[0].metric("State", state)
    cols[1].metric("Duration", duration(run["seconds"]))
    cols[2].metric("Stages", len(str(run["stages"]).split(",")))
    cols[3].metric("Failed items", fmt(int(mine["failed"].sum())) if not mine.empty else "0")
    st.caption(f"run `{run_id}` started {fmt(run['started_at'])} UTC by `{run['command']}`")
    if run["message"]:
        (st.error if run["state"] == "failed" else st.warning)(run["message"])
    if mine.empty:
        st.info("This run has not planned any stage yet.")
    else:
        for row in mine.itertuples():
            finished = row.done + row.filtered + row.failed
            share = finished / row.to_run if row.to_run else 1.0
            st.progress(
                min(share, 1.0),
                text=f"**{row.stage}**: {finished} of {row.to_run} run · {row.cached} cached"
                f" · {row.failed} failed · {row.pending} pending",
            )
        st.altair_chart(
            stage_bars(mine, list(PROGRESS_PARTS), "items per stage in this run"), width="stretch"
        )
        st.table(shown(mine), hide_index=True)
    st.subheader("Current items per stage (every run)")
    state_rows = q("01_pipeline_state")
    if not nothing(state_rows, "No stage has committed an item yet."):
        st.altair_chart(
            stage_bars(state_rows, ["done", "filtered", "failed"], "current version of each item"),
            width="stretch",
        )
    st.subheader("All runs")
    st.dataframe(runs, hide_index=True)


def failures_page(q: Query) -> None:
    st.title("Failures")
    by_kind = q("04_failures_by_kind")
    if by_kind.empty:
        st.success("No current failures: every item the current plans hold is done or filtered.")
        return
    st.metric("Failed items", fmt(int(by_kind["items"].sum())))
    chart = (
        alt.Chart(by_kind, title="current failures by stage and kind")
        .mark_bar()
        .encode(
            y=alt.Y("stage:N", title=None),
            x=alt.X("sum(items):Q", title="items", axis=WHOLE),
            color=alt.Color("error_kind:N", title="kind"),
            tooltip=["stage", "error_kind", "items", "retryable", "example"],
        )
    )
    st.altair_chart(chart, width="stretch")
    st.table(shown(by_kind), hide_index=True)
    st.subheader("Every failure with its message")
    details = q("11_failures")
    left, right = st.columns(2)
    stage = left.selectbox("Stage", ["all", *sorted(details["stage"].unique())])
    kind = right.selectbox("Kind", ["all", *sorted(details["error_kind"].unique())])
    if stage != "all":
        details = details[details["stage"] == stage]
    if kind != "all":
        details = details[details["error_kind"] == kind]
    st.dataframe(details, hide_index=True)
    st.caption(
        "Retry them with `talkforge resume --retry-failed`; list them with `talkforge failures`."
    )


def versions_page(q: Query) -> None:
    st.title("Versions per stage")
    versions = q("14_versions")
    if nothing(versions, "No stage has written an item yet, so there are no versions."):
        return
    counts = versions.groupby("stage", sort=False).size()
    cols = st.columns(min(len(counts), 6))
    for i, (stage, n) in enumerate(counts.items()):
        cols[i % len(cols)].metric(stage, f"{n} version{'s' if n != 1 else ''}")
    timeline = (
        alt.Chart(versions, title="when each version was written")
        .mark_bar(size=14)
        .encode(
            y=alt.Y("stage:N", sort=list(counts.index), title=None),
            x=alt.X("first_at:T", title=None),
            x2="last_at:T",
            color=alt.Color("current:N", title="current"),
            tooltip=["stage", "code_version", "config_hash", "models_hash", "items", "runs"],
        )
    )
    st.altair_chart(timeline, width="stretch")
    st.table(shown(versions), hide_index=True)
    st.caption(
        "A version is (code version, stage config, model weights); `current` is the one "
        "the latest plans hold. `talkforge versions STAGE` lists the same."
    )
