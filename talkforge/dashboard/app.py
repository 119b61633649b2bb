"""Streamlit entry script of the dashboard (``talkforge dashboard`` runs it; see __init__).

Arguments after ``--``: ``--config PATH`` and ``--set key=value`` (as for every command).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import streamlit as st

from talkforge.dashboard import data
from talkforge.dashboard.pages_data import dataset_page, quality_page
from talkforge.dashboard.pages_models import evaluation_page, models_page, training_page
from talkforge.dashboard.pages_ops import Query, failures_page, runs_page, versions_page

PAGES: list[tuple[str, str, Callable[[Query], None]]] = [
    ("runs", "Runs", runs_page),
    ("failures", "Failures", failures_page),
    ("quality", "Quality rules", quality_page),
    ("datasets", "Datasets", dataset_page),
    ("versions", "Versions", versions_page),
    ("training", "Training", training_page),
    ("evaluation", "Evaluation", evaluation_page),
    ("models", "Models used", models_page),
]


def query_for(argv: list[str]) -> Query:
    """Saved query name → rows, over the catalog of the config named in ``argv``."""
    config, overrides = data.parse_args(argv)
    return lambda name: data.saved(config, overrides, name)


def render(path: str, q: Query) -> None:
    """Draw page ``path``; inside an auto-refreshing fragment when the sidebar asks."""
    draw = {p: fn for p, _, fn in PAGES}[path]
    if st.session_state.get("auto_refresh"):
        st.fragment(run_every=data.REFRESH_S)(draw)(q)
    else:
        draw(q)


def main() -> None:
    config, overrides = data.parse_args(sys.argv[1:])
    st.set_page_config(page_title="talkforge", layout="wide")
    q = query_for(sys.argv[1:])

    def page(path: str, title: str) -> st.Page:
        def show() -> None:
            render(path, q)

        show.__name__ = f"page_{path}"
        return st.Page(show, title=title, url_path=path, default=path == "runs")

    nav = st.navigation([page(path, title) for path, title, _ in PAGES])
    with st.sidebar:
        cfg = data.pipeline_config(config, overrides)
        st.caption(f"config `{config}`  \ncatalog `{data.catalog(config, overrides).uri}`")
        if st.button("Refresh now"):
            data.saved.clear()
        st.toggle(f"Auto-refresh every {data.REFRESH_S} s", key="auto_refresh")
        st.caption(f"data root `{cfg.data_root}`")
    nav.run()


if __name__ == "__main__":  # streamlit runs this file as __main__
    main()
