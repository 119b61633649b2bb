"""Pages about models: training curves per checkpoint, evaluation tables, models used."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from talkforge.dashboard.data import fmt, shown
from talkforge.dashboard.pages_ops import Query, nothing

CURVES = {
    "loss": "loss per step",
    "lr": "learning rate per step",
    "grad_norm": "gradient norm per step (before clipping)",
    "samples_per_s": "samples per second",
}


def checkpoint_label(row: pd.Series) -> str:
    current = " (current)" if row["current"] else ""
    return f"{row['family']}/{row['training_stage']} {str(row['checkpoint'])[:10]}{current}"


def training_page(q: Query) -> None:
    st.title("Training curves")
    curves = q("15_train_curves")
    if nothing(curves, "No training history yet: the train stage has not committed a checkpoint."):
        return
    curves = curves.assign(label=curves.apply(checkpoint_label, axis=1))
    summary = (
        curves.sort_values("step")
        .groupby("label", sort=False)
        .agg(
            family=("family", "first"),
            training_stage=("training_stage", "first"),
            run_id=("run_id", "first"),
            steps=("step", "max"),
            first_loss=("loss", "first"),
            final_loss=("loss", "last"),
            min_loss=("loss", "min"),
            processes=("num_processes", "max"),
        )
        .reset_index()
    )
    cols = st.columns(3)
    cols[0].metric("Checkpoints", fmt(len(summary)))
    cols[1].metric("Steps (longest)", fmt(int(summary["steps"].max())))
    current = summary[summary["label"].str.endswith("(current)")]
    best = current if not current.empty else summary
    cols[2].metric("Final loss (current)", fmt(float(best["final_loss"].iloc[-1])))
    for field, title in CURVES.items():
        if curves[field].isna().all():
            continue
        chart = (
            alt.Chart(curves, title=title)
            .mark_line(point=len(curves) <= 200)
            .encode(
                x=alt.X("step:Q"),
                y=alt.Y(f"{field}:Q", scale=alt.Scale(zero=False)),
                color=alt.Color("label:N", title="checkpoint"),
                tooltip=["label", "step", field],
            )
        )
        st.altair_chart(chart, width="stretch")
    st.table(shown(summary), hide_index=True)


def evaluation_page(q: Query) -> None:
    st.title("Evaluation")
    table = q("06_eval_metrics")
    if nothing(table, "No evaluation yet: the evaluate stages have not run."):
        return
    if table["model_origin"].astype(str).str.contains("random-init").any():
        st.warning(
            "Some metric networks are random-init stand-ins: their numbers only show that "
            "the harness runs, not how good a model is (see the Models page)."
        )
    for (family, setting), group in table.groupby(["family", "setting"], sort=True):
        st.subheader(f"{family} · {setting}")
        clip = group[group["level"] == "clip"]
        if not clip.empty:
            long = clip.melt(
                id_vars=["metric", "checkpoint"],
                value_vars=["generated", "ground_truth"],
                var_name="row",
                value_name="mean",
            ).dropna(subset=["mean"])
            chart = (
                alt.Chart(long)
                .mark_bar()
                .encode(
                    x=alt.X("row:N", title=None, axis=alt.Axis(labels=False, ticks=False)),
                    y=alt.Y("mean:Q", title=None),
                    color=alt.Color("row:N", title=None),
                    column=alt.Column("metric:N", title=None),
                    tooltip=["metric", "checkpoint", "row", "mean"],
                )
                .resolve_scale(y="independent")
                .properties(width=70, height=160)
            )
            st.altair_chart(chart)
        st.table(shown(group.drop(columns=["family", "setting"])), hide_index=True)


def models_page(q: Query) -> None:
    st.title("Models used")
    models = q("16_model_origins")
    if nothing(models, "No model has produced a current result yet."):
        return
    origins = models.groupby("origin")["model"].nunique()
    cols = st.columns(max(len(origins), 1))
    for i, (origin, n) in enumerate(origins.items()):
        cols[i].metric(f"{origin} models", fmt(int(n)))
    random = models[models["origin"].astype(str).str.contains("random-init")]
    if not random.empty:
        names = ", ".join(sorted(set(random["model"])))
        st.warning(
            f"Random-init (built from config, no real weights): {names}. What they "
            "produced (features, transcripts, metric values) is not meaningful."
        )
    chart = (
        alt.Chart(models, title="current items per model and stage")
        .mark_bar()
        .encode(
            y=alt.Y("model:N", title=None),
            x=alt.X("items:Q"),
            color=alt.Color(
                "origin:N",
                scale=alt.Scale(domain=["pretrained", "random-init"], range=["#2e7d32", "#ef6c00"]),
            ),
            row=alt.Row("used_by:N", title=None),
            tooltip=["used_by", "model", "origin", "weights_sha256", "items"],
        )
        .resolve_scale(y="independent")
    )
    st.altair_chart(chart)
    st.table(shown(models), hide_index=True)
