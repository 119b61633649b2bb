"""Download benchmark: clips per second per core through download + cut + normalize.

    .venv/bin/python benchmarks/bench_download.py [--sources 6] [--clips-per-source 4]
                                                  [--clip-s 2.0] [--out DIR]

Both contenders fetch the same HDTF-format manifest from a loopback HTTP server in this
process (real mp4 files: the generated sample videos, 11-13 s each, served under several
ids) and produce 25 fps clips with 16 kHz mono audio:

- **talkforge**: the download stage as ops run it (``Engine.run_stage``: catalog, Ray
  workers, one download per source through the shared raw cache, input-seeking cut that
  writes the clip and its wav in one ffmpeg call, verification, atomic commits). Ray is
  started before the clock starts; its workers' start-up is timed.
- **naive baseline**: what a first script does, measured in the same run on the same
  machine: for every clip, sequentially, one ``yt-dlp`` call (re-downloading a source for
  each of its clips) and one ``ffmpeg`` call (output seeking, re-encode to 25 fps / 16 kHz
  mono).

Figures: wall seconds, clips/s/core (cores = ``os.cpu_count()``, the same for both), and
the ratio talkforge / baseline. Written to ``<out>/bench_download.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.download.sample import build_sample_dataset  # noqa: E402
from tests.loopback_server import Route, serve  # noqa: E402


def write_manifest(meta: Path, ids: list[str], clips_per_source: int, clip_s: float) -> None:
    """An HDTF-format RD subset: one url/resolution/annotation line per source."""
    meta.mkdir(parents=True, exist_ok=True)
    names = [f"Bench{i}" for i in range(len(ids))]
    (meta / "RD_video_url.txt").write_text(
        "".join(
            f"{n} https://www.youtube.com/watch?v={v}\n" for n, v in zip(names, ids, strict=True)
        )
    )
    (meta / "RD_resolution.txt").write_text("".join(f"{n}.mp4 720\n" for n in names))
    ranges = " ".join(
        f"00:{int(k * clip_s):02d}-00:{int((k + 1) * clip_s):02d}" for k in range(clips_per_source)
    )
    (meta / "RD_annotion_time.txt").write_text("".join(f"{n}.mp4 {ranges}\n" for n in names))
    (meta / "RD_crop_wh.txt").write_text("")
    (meta / "RD_crop_ratio.txt").write_text("")


def run_talkforge(tmp: Path, meta: Path, base_url: str) -> tuple[float, int]:
    import ray

    from talkforge.config import load_config
    from talkforge.engine import Engine, RunOptions

    cfg_path = tmp / "bench.yaml"
    cfg_path.write_text(
        f"project: {{data_root: {tmp / 'data'}}}\n"
        "download:\n"
        "  sample: {enabled: false}\n"
        "  resources: {num_workers: 2}\n"
        "  datasets:\n"
        f"    - {{kind: hdtf, metadata: {meta}, subsets: [RD],\n"
        f"       url_template: '{base_url}/{{id}}.mp4'}}\n"
    )
    config = load_config(cfg_path)
    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    engine = Engine(config, config_path=str(cfg_path))
    options = RunOptions(stages=["download"])
    try:
        run_id = engine.start_run("bench", options)
        started = time.perf_counter()
        summary = engine.run_stage(run_id, "download", options)
        elapsed = time.perf_counter() - started
        engine.finish_run(run_id, "finished", options)
    finally:
        engine.close()
    return elapsed, summary.done


def run_naive(tmp: Path, urls: list[str], clips_per_source: int, clip_s: float) -> float:
    work = tmp / "naive"
    work.mkdir()
    started = time.perf_counter()
    for s, url in enumerate(urls):
        for k in range(clips_per_source):
            raw = work / "raw.mp4"
            fetch = [sys.executable, "-m", "yt_dlp", "-q", "--no-cache-dir", "-f", "b"]
            subprocess.run([*fetch, "-o", str(raw), "--force-overwrites", url], check=True)
            cut = ["-ss", f"{k * clip_s}", "-to", f"{(k + 1) * clip_s}"]
            encode = ["-r", "25", "-c:v", "libx264", "-c:a", "aac", "-ar", "16000", "-ac", "1"]
            out = str(work / f"clip-{s}-{k}.mp4")
            subprocess.run(
                ["ffmpeg", "-v", "error", "-y", "-i", str(raw), *cut, *encode, out], check=True
            )
            raw.unlink()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=6)
    parser.add_argument("--clips-per-source", type=int, default=4)
    parser.add_argument("--clip-s", type=float, default=2.0)
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    if args.clips_per_source * args.clip_s > 11:
        parser.error("clips must fit in the 11 s sample videos")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="tf-bench-dl-") as tmp_name:
        tmp = Path(tmp_name)
        videos = sorted((build_sample_dataset(tmp / "sample") / "videos").glob("*.mp4"))
        ids = [f"benchSrc{i:03d}" for i in range(args.sources)]
        write_manifest(tmp / "meta", ids, args.clips_per_source, args.clip_s)
        with serve() as server:
            urls = [
                server.add(f"{vid}.mp4", Route(videos[i % len(videos)].read_bytes()))
                for i, vid in enumerate(ids)
            ]
            ours_s, done = run_talkforge(tmp, tmp / "meta", server.base_url)
            naive_s = run_naive(tmp, urls, args.clips_per_source, args.clip_s)
    clips = args.sources * args.clips_per_source
    ours_rate = done / ours_s / cores
    naive_rate = clips / naive_s / cores
    result = {
        "sources": args.sources,
        "clips": clips,
        "clips_done_talkforge": done,
        "clip_s": args.clip_s,
        "cores": cores,
        "talkforge_s": round(ours_s, 2),
        "naive_s": round(naive_s, 2),
        "talkforge_clips_per_s_per_core": round(ours_rate, 4),
        "naive_clips_per_s_per_core": round(naive_rate, 4),
        "talkforge_over_naive": round(ours_rate / naive_rate, 2),
    }
    (out / "bench_download.json").write_text(json.dumps(result, indent=2))
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    return 0 if done == clips else 1


if __name__ == "__main__":
    raise SystemExit(main())
