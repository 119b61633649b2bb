"""Pages about the data: quality rules and their score histograms, dataset hours/languages."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from talkforge.dashboard.data import fmt, shown
from talkforge.dashboard.pages_ops import Query, nothing

# what a rule's ``attention`` (03_quality_rules.sql) says, and how loudly
ATTENTION = {
    "fails EVERY clip": st.error,
    "unmeasured on EVERY clip": st.warning,
    "fails no clip": st.info,
}
VERDICT_COLORS = {"passed": "#2e7d32", "failed": "#c62828", "unmeasured": "#b0bec5"}
RULE_COLUMNS = [
    "dataset",
    "rule",
    "hard",
    "clips",
    "passed",
    "failed",
    "unmeasured",
    "removed",
    "removed_only_here",
    "threshold",
    "min",
    "p50",
    "max",
    "attention",
]


def histogram(bins: pd.DataFrame, rule: str) -> alt.LayerChart:
    """One rule's score histogram (verdicts stacked) with its threshold as a dashed line."""
    long = bins.melt(
        id_vars=["bin_from", "bin_to"],
        value_vars=list(VERDICT_COLORS),
        var_name="verdict",
        value_name="clips",
    )
    bars = (
        alt.Chart(long, title=rule)
        .mark_bar()
        .encode(
            x=alt.X("bin_from:Q", bin="binned", title="score"),
            x2="bin_to:Q",
            y=alt.Y("clips:Q", title="clips"),
            color=alt.Color(
                "verdict:N",
                scale=alt.Scale(domain=list(VERDICT_COLORS), range=list(VERDICT_COLORS.values())),
                title=None,
            ),
            tooltip=["bin_from", "bin_to", "verdict", "clips"],
        )
    )
    threshold = bins["threshold"].dropna()
    if threshold.empty:
        return alt.layer(bars)
    line = (
        alt.Chart(pd.DataFrame({"threshold": [float(threshold.iloc[0])]}))
        .mark_rule(strokeDash=[4, 3], color="black")
        .encode(x="threshold:Q", tooltip=["threshold"])
    )
    return alt.layer(bars, line)


def quality_page(q: Query) -> None:
    st.title("Quality rules")
    rules = q("03_quality_rules")
    if nothing(rules, "No quality verdicts yet: the quality stage has not run."):
        return
    for attention, say in ATTENTION.items():
        hit = rules[rules["attention"] == attention]
        if not hit.empty:
            names = ", ".join(f"**{r.rule}** ({r.dataset or '–'})" for r in hit.itertuples())
            say(f"{attention[0].upper()}{attention[1:]}: {names}")
    if int(rules["removed"].sum()) == 0:
        st.success("No rule removed a clip.")
    else:
        removed = (
            alt.Chart(rules, title="clips removed per rule (hard rules; soft rules only weight)")
            .mark_bar()
            .encode(
                y=alt.Y("rule:N", sort="-x", title=None),
                x=alt.X("removed:Q", title="clips removed"),
                color=alt.Color("dataset:N"),
                tooltip=["dataset", "rule", "clips", "failed", "removed", "removed_only_here"],
            )
        )
        st.altair_chart(removed, width="stretch")
    st.table(shown(rules[[c for c in RULE_COLUMNS if c in rules.columns]]), hide_index=True)
    st.subheader("Score histograms")
    bins = q("12_quality_histograms")
    if nothing(bins, "No rule has a measured score."):
        return
    names = list(dict.fromkeys(bins["rule"]))
    cols = st.columns(2)
    for i, rule in enumerate(names):
        cols[i % 2].altair_chart(histogram(bins[bins["rule"] == rule], rule), width="stretch")
    st.caption("Dashed line: the threshold. `talkforge quality --histogram RULE` prints one.")


def dataset_page(q: Query) -> None:
    st.title("Datasets")
    published = q("08_manifests")
    downloaded = q("02_dataset_hours")
    languages = q("13_languages_speakers")
    if published.empty and downloaded.empty:
        st.info("No dataset ingested or downloaded yet: run `talkforge ingest` or `talkforge run`.")
        return
    cols = st.columns(5)
    cols[0].metric("Datasets", fmt(len(set(published["dataset"]) | set(downloaded["dataset"]))))
    cols[1].metric("Published hours", fmt(float(published["hours"].sum())))
    cols[2].metric("Downloaded clips", fmt(int(downloaded["clips"].sum())))
    cols[3].metric("Downloaded hours", fmt(float(downloaded["hours"].sum())))
    cols[4].metric("Speakers", fmt(int(published["speakers"].sum())))
    if not published.empty:
        hours = pd.concat(
            [
                published[["dataset", "hours"]].assign(kind="published"),
                downloaded[["dataset", "hours"]].assign(kind="downloaded"),
            ]
        )
        chart = (
            alt.Chart(hours, title="hours per dataset")
            .mark_bar()
            .encode(
                y=alt.Y("dataset:N", title=None),
                yOffset="kind:N",
                x=alt.X("hours:Q"),
                color=alt.Color("kind:N", title=None),
                tooltip=["dataset", "kind", "hours"],
            )
        )
        st.altair_chart(chart, width="stretch")
        st.subheader("Published metadata and download progress")
        st.table(shown(published), hide_index=True)
    if not downloaded.empty:
        st.subheader("Downloaded clips")
        st.table(shown(downloaded), hide_index=True)
    st.subheader("Languages and speakers")
    if nothing(languages, "The metadata states no language or speaker."):
        return
    chart = (
        alt.Chart(languages, title="hours per language")
        .mark_bar()
        .encode(
            y=alt.Y("language:N", sort="-x", title=None),
            x=alt.X("sum(hours):Q", title="hours"),
            color=alt.Color("dataset:N"),
            tooltip=["dataset", "language", "clips", "hours", "speakers"],
        )
    )
    st.altair_chart(chart, width="stretch")
    st.table(shown(languages), hide_index=True)
