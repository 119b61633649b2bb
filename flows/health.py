"""Container health checks: ``python -m flows.health [URL ...]`` exits 0 when every URL answers.

The image's default check (no URL) asks the ``talkforge serve`` runner's own health
endpoint (Prefect's runner webserver, ``PREFECT_RUNNER_SERVER_ENABLE=true``), which fails
when the runner has stopped polling the Prefect server. Compose services that run
something else (the dashboard, the Ray head) name their own URL or command.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def runner_health_url() -> str:
    host = os.environ.get("PREFECT_RUNNER_SERVER_HOST", "127.0.0.1")
    port = os.environ.get("PREFECT_RUNNER_SERVER_PORT", "8080")
    return f"http://{host if host != '0.0.0.0' else '127.0.0.1'}:{port}/health"  # noqa: S104


def healthy(url: str, timeout_s: float = 5.0) -> bool:
    """True when ``url`` (http on this host) answers with a 2xx status."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url!r}")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
            return 200 <= response.status < 300
    except OSError:
        return False


def main(argv: list[str]) -> int:
    urls = argv or [runner_health_url()]
    bad = [url for url in urls if not healthy(url)]
    for url in bad:
        print(f"unhealthy: {url}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
