"""Environment Prefect reads when it is first imported: set it before ``import prefect``.

Prefect configures logging once, at import, from environment variables. Our loggers reach
the flow run's log pane in the UI only if they are named in
``PREFECT_LOGGING_EXTRA_LOGGERS`` by then — in this process *and* in the flow-run
subprocesses a served deployment starts, which inherit this environment. This module
imports nothing heavy so the CLI can apply :func:`prefect_defaults` first thing.
"""

from __future__ import annotations

import os

LOGGERS = ("talkforge", "tasks", "models", "storage", "flows", "generators", "metrics")

# what the operator set before we filled in defaults (None: not set)
USER_LOGGING_LEVEL = os.environ.get("PREFECT_LOGGING_LEVEL")


def prefect_defaults(logging_level: str = "WARNING") -> dict[str, str]:
    """The Prefect settings every talkforge process wants that the environment lacks
    (``os.environ.update(prefect_defaults())`` fills them in, never overwriting)."""
    wanted = {
        "PREFECT_LOGGING_EXTRA_LOGGERS": ",".join(LOGGERS),
        "PREFECT_LOGGING_LEVEL": logging_level,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    return {k: v for k, v in wanted.items() if k not in os.environ}
