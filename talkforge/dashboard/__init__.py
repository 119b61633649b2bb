"""The browser dashboard: a Streamlit app over the catalog, started by ``talkforge dashboard``.

Every number on it comes from a saved query in ``dashboards/*.sql`` run through
:meth:`storage.catalog.Catalog.query_readonly` — the guarded read-only path of
``talkforge sql`` — so a number on a page can always be reproduced in the terminal with
``talkforge sql "$(cat dashboards/<name>.sql)"``. The server binds to 127.0.0.1 unless
``--host`` says otherwise (there is no authentication; put a proxy in front to share it).

Why Streamlit: it is already in the pinned stack (no conflict with prefect/ray/torch), it
ships a test client, and altair charts render in the browser without a build step.
"""

from __future__ import annotations

import sys
from pathlib import Path

APP = Path(__file__).with_name("app.py")


def streamlit_command(
    config: str, overrides: list[str], host: str = "127.0.0.1", port: int = 8501
) -> list[str]:
    """The ``streamlit run`` argument list serving the dashboard for one config."""
    app_args = ["--config", config]
    for item in overrides:
        app_args += ["--set", item]
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--server.fileWatcherType",
        "none",
        "--browser.gatherUsageStats",
        "false",
        "--global.developmentMode",
        "false",
        "--client.toolbarMode",
        "viewer",
        "--",
        *app_args,
    ]
