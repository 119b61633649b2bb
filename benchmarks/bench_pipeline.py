"""Pipeline benchmark: cold run, fully cached re-run, peak memory — in one invocation.

    .venv/bin/python benchmarks/bench_pipeline.py [--config configs/default.yaml] [--out DIR]

Runs ``talkforge run`` three times on a fresh data root: the cold run does all the work
(sample generation excluded: it is built once, before timing, into a shared folder), the
second run finds everything committed, and so does the third (the figure a later re-run
gets). The target is cached/cold ≤ 0.05. Peak memory is the
largest resident set of the whole process tree (CLI, Prefect server, Ray and its workers,
accelerate's training processes), sampled every 100 ms with psutil. Figures are printed
as a table and written to ``<out>/bench_pipeline.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, int, int]:
    """Run ``cmd``; return (wall seconds, peak tree RSS bytes, exit code)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                peak = max(peak, total)
            except psutil.Error:
                pass
            stop.wait(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, stderr = proc.communicate()
    stop.set()
    thread.join()
    if proc.returncode != 0:
        sys.stderr.write(stderr.decode(errors="replace")[-2000:])
    return time.perf_counter() - started, peak, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "talkforge.cli", "run", "--config", args.config]
    with tempfile.TemporaryDirectory(prefix="tf-bench-") as tmp:
        sample_dir = Path(tmp) / "sample"
        root = Path(tmp) / "data"
        overrides = [
            "--set",
            f"project.data_root={root}",
            "--set",
            f"download.sample.dir={sample_dir}",
        ]
        # build the sample dataset once, outside the timed runs
        warm = [
            *cli,
            *overrides,
            "--stages",
            "download",
            "--limit",
            "1",
            "--set",
            f"project.data_root={Path(tmp) / 'warm'}",
        ]
        run_measured(warm, env)
        cold_s, cold_peak, cold_rc = run_measured([*cli, *overrides], env)
        cached_s, cached_peak, cached_rc = run_measured([*cli, *overrides], env)
        again_s, _, again_rc = run_measured([*cli, *overrides], env)
    result = {
        "config": args.config,
        "cold_run_s": round(cold_s, 2),
        "cached_rerun_s": round(cached_s, 2),
        "cached_over_cold": round(cached_s / cold_s, 4),
        "cached_rerun_again_s": round(again_s, 2),
        "target_cached_over_cold": 0.05,
        "cold_peak_rss_mib": round(cold_peak / 2**20, 1),
        "cached_peak_rss_mib": round(cached_peak / 2**20, 1),
        "exit_codes": [cold_rc, cached_rc, again_rc],
        "cpus": os.cpu_count(),
    }
    (out / "bench_pipeline.json").write_text(json.dumps(result, indent=2))
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    return 0 if cold_rc == cached_rc == again_rc == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
