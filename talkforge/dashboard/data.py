"""Where the dashboard's numbers come from: saved queries, read-only, cached for a few seconds.

Kept free of page layout so the tests can ask the same questions the pages ask. A query
result is cached per (catalog, query) for :data:`REFRESH_S` seconds: a page re-rendered by
a click does not reopen the catalog, and a run in progress shows up within that time.
"""

from __future__ import annotations

import argparse
import math
from datetime import datetime
from pathlib import Path

import pandas as pd
import streamlit as st

from storage.catalog import Catalog
from talkforge.config import PipelineConfig, load_config

DASHBOARDS_DIR = Path(__file__).resolve().parents[2] / "dashboards"
REFRESH_S = 10


def parse_args(argv: list[str]) -> tuple[str, tuple[str, ...]]:
    """``--config PATH`` and repeated ``--set key=value`` (what ``talkforge dashboard`` passes)."""
    parser = argparse.ArgumentParser(prog="talkforge dashboard", add_help=False)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args, _ = parser.parse_known_args(argv)
    return args.config, tuple(args.overrides)


@st.cache_resource(show_spinner=False)
def pipeline_config(config: str, overrides: tuple[str, ...]) -> PipelineConfig:
    return load_config(Path(config), list(overrides))


@st.cache_resource(show_spinner=False)
def catalog(config: str, overrides: tuple[str, ...]) -> Catalog:
    cfg = pipeline_config(config, overrides)
    return Catalog(cfg.data_root / "catalog", cfg.catalog)


def saved_sql(name: str) -> str:
    """The text of ``dashboards/<name>.sql``."""
    return (DASHBOARDS_DIR / f"{name}.sql").read_text()


@st.cache_data(ttl=REFRESH_S, show_spinner=False)
def saved(config: str, overrides: tuple[str, ...], name: str) -> pd.DataFrame:
    """The rows of saved query ``name`` over the catalog of (config, overrides)."""
    return catalog(config, overrides).query_readonly(saved_sql(name)).to_pandas()


def fmt(value: object) -> str:
    """How a number is written on the pages (and in the tests that compare them to SQL)."""
    if value is None or value is pd.NaT or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == int(value) and abs(value) < 1e12:
            return f"{int(value):,}"
        return f"{value:,.4g}" if abs(value) >= 1e-3 else f"{value:.3e}"
    return str(value)


def shown(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every cell written by :func:`fmt` (for tables read in the browser)."""
    out = frame.copy()
    for col in out.columns:
        out[col] = [fmt(v.item() if hasattr(v, "item") else v) for v in out[col]]
    return out
