"""Face-stage benchmark: frames per second against the decode-only ceiling, and memory.

    .venv/bin/python benchmarks/bench_faces.py [--seconds 8] [--long-factor 10] [--out DIR]

Inputs are built in the run: a talking clip at 25 fps (a real fixture clip from
``../shared/fixtures/clips`` when present, else the generated sample video), normalized
like the download stage does, and a clip ``--long-factor`` times longer (the same clip
looped). Each measurement runs in a fresh child process so its peak RSS is its own:

- **ceiling**: the clip decoded to nothing by the same decoder the stage uses
  (``tasks.media.iter_frames``, the ffmpeg pipe, same frame size; the stage reads smaller
  chunks from a background thread, which changes decode speed by less than the noise);
- **faces**: ``FacesStage.process`` with the shipped-weights detector (MTCNN from
  facenet-pytorch) and detect-every-k tracking, as configured by default;
- **faces on the long clip**: the same, for the peak-memory ratio (streaming: frames are
  never all in memory, so the ratio should stay near 1).

Figures: fps of each, faces/ceiling (target ≥ 0.70), peak RSS long/short (target ≤ 1.2).
Written to ``<out>/bench_faces.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED_CLIP = REPO.parent / "shared" / "fixtures" / "clips" / "face_3.mp4"


def _child(mode: str, clip_dir: Path, work: Path) -> dict:
    """Runs in a fresh process: one measurement, as a dict."""
    from tasks.base import ItemContext, ItemInputs, StageEnv
    from tasks.faces import FacesStage
    from tasks.faces_config import FacesConfig
    from tasks.media import iter_frames, probe
    from tasks.records import NormalizedClip

    clip = NormalizedClip.model_validate_json((clip_dir / "clip.json").read_text())
    video = clip_dir / "clip.mp4"
    if mode == "ceiling":
        info = probe(video)
        started = time.perf_counter()
        frames = sum(len(chunk) for chunk in iter_frames(video, info.width, info.height))
        elapsed = time.perf_counter() - started
    else:
        env = StageEnv(data_root=str(work), store_uri=str(work / "store"), run_id="bench")
        stage = FacesStage(FacesConfig(), env)
        stage.setup()  # model load is per worker, not per clip: not timed
        ctx = ItemContext(env.store(), "faces", clip.clip_id, "b" * 40)
        started = time.perf_counter()
        record = stage.process(ItemInputs(item_id=clip.clip_id, records={"download": clip}), ctx)
        elapsed = time.perf_counter() - started
        frames = record.num_frames
        ctx.close()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"frames": frames, "seconds": elapsed, "peak_rss_mib": peak_kib / 1024}


def _make_clip(src: Path, out_dir: Path, seconds: float, loops: int) -> Path:
    """A normalized clip (25 fps, h264 + 16 kHz wav) committed like the download stage."""
    from tests.faces_helpers import commit_normalized_clip

    out_dir.mkdir(parents=True)
    video, wav = out_dir / "clip.mp4", out_dir / "audio.wav"
    subprocess.run(
        ["ffmpeg", "-v", "error", "-stream_loop", str(loops - 1), "-i", str(src),
         "-t", str(seconds * loops), "-vf", "fps=25", "-c:v", "libx264", "-preset", "veryfast",
         "-crf", "17", "-pix_fmt", "yuv420p", "-c:a", "aac", "-ar", "16000", "-ac", "1",
         str(video)],
        check=True,
    )  # fmt: skip
    subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(video), "-ac", "1", "-ar", "16000", str(wav)],
        check=True,
    )
    record = commit_normalized_clip(out_dir, "bench", video, wav, 25.0)
    (out_dir / "clip.json").write_text(record.model_dump_json())
    return out_dir


def _measure(mode: str, clip_dir: Path, work: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--clip-dir", str(clip_dir), "--work",
         str(work)],
        check=True, capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--long-factor", type=int, default=10)
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--child", choices=["ceiling", "faces"], help=argparse.SUPPRESS)
    parser.add_argument("--clip-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.clip_dir, args.work)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tf-bench-faces-") as tmp_name:
        tmp = Path(tmp_name)
        if SHARED_CLIP.is_file():
            src = SHARED_CLIP
        else:
            from tasks.download.sample import build_sample_dataset

            src = sorted((build_sample_dataset(tmp / "sample") / "videos").glob("*.mp4"))[0]
        short = _make_clip(src, tmp / "short", args.seconds / 2, 2)
        long = _make_clip(src, tmp / "long", args.seconds / 2, 2 * args.long_factor)
        ceiling = _measure("ceiling", short, tmp / "w1")
        faces = _measure("faces", short, tmp / "w2")
        faces_long = _measure("faces", long, tmp / "w3")
    fps = {k: v["frames"] / v["seconds"] for k, v in
           {"ceiling": ceiling, "faces": faces, "faces_long": faces_long}.items()}  # fmt: skip
    result = {
        "source": str(src.name),
        "frames_short": faces["frames"],
        "frames_long": faces_long["frames"],
        "decode_only_fps": round(fps["ceiling"], 1),
        "faces_fps": round(fps["faces"], 1),
        "faces_long_fps": round(fps["faces_long"], 1),
        "faces_over_ceiling": round(fps["faces"] / fps["ceiling"], 3),
        "target_faces_over_ceiling": 0.70,
        "peak_rss_short_mib": round(faces["peak_rss_mib"], 1),
        "peak_rss_long_mib": round(faces_long["peak_rss_mib"], 1),
        "peak_rss_long_over_short": round(faces_long["peak_rss_mib"] / faces["peak_rss_mib"], 3),
        "target_rss_ratio": 1.2,
        "cpus": os.cpu_count(),
    }
    (out / "bench_faces.json").write_text(json.dumps(result, indent=2))
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
