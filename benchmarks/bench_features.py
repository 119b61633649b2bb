"""Features benchmark: the features stage on Ray against naive per-extractor scripts.

    .venv/bin/python benchmarks/bench_features.py [--clips 8] [--frames 75] [--size 256]

All contenders process the same synthetic clips (face crops at ``--size`` px, 25 fps, with
16 kHz speech-like audio) with the same models: the stage's default config (tiny random
VAE, LivePortrait motion extractor, EMOCA, DINOv2, HuBERT, built once before timing).

- **naive**: what per-step seed scripts do: for every clip, one process per extractor
  (VAE, motion, FLAME, reference, HuBERT), each importing torch, loading its model and
  re-decoding the clip's video (or reading its audio), then writing its safetensors file.
- **stage, 1 worker** and **stage, 2 workers**: ``FeaturesStage`` in a Ray actor pool
  (``talkforge.executors.RayExecutor``), models loaded once per actor, one decode per
  clip for all video extractors. The pool is warmed with one clip before the clock starts
  (actor start-up and model loading happen once per worker, not per clip, and are
  reported separately).
- **stage, own pools**: the same stage with ``pools.placement: own_pools``: one stage
  worker (decode, dispatch, write; 0.5 CPU) and one Ray actor pool per extractor (6 × 0.25
  CPU), each extractor sent its own frames (the crops, or its framing of the clip). This
  is the GPU-cluster layout; on a CPU-only machine it shows what the process hops cost
  against ``in_worker``.

Figures: clips/s of each, stage(2 workers)/naive (target ≥ 4 on 2 cores),
2 workers / 1 worker (target ≥ 1.7) and own pools / 2 in-worker workers. Written to
``<out>/bench_features.json``.
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
NAIVE_STEPS = ("vae", "motion", "flame", "reference", "hubert")


def naive_step(step: str, data_root: Path, crops: Path, wav: Path, out: Path) -> None:
    """One seed-style script: load the model for this clip, decode, extract, save."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from models.registry import ensure_model
    from tasks.features_config import FeaturesConfig
    from tasks.media import iter_frames, probe, read_wav

    cfg = FeaturesConfig()
    torch.set_num_threads(1)
    if step == "hubert":
        from models.hubert import extract_hubert, load_hubert, make_feature_extractor

        model = load_hubert(ensure_model(cfg.hubert, data_root))
        wave, _ = read_wav(wav)
        (feats,) = extract_hubert(model, make_feature_extractor(), [wave], layer=-1)
        save_file({"features": torch.from_numpy(np.asarray(feats))}, str(out))
        return
    info = probe(crops)
    frames = np.concatenate(list(iter_frames(crops, info.width, info.height)))
    if step == "vae":
        from models.vae import encode_frames, load_vae

        result = encode_frames(load_vae(ensure_model(cfg.vae, data_root)), frames, 8)
    elif step == "motion":
        from models.liveportrait import extract_motion, load_motion_extractor

        model = load_motion_extractor(ensure_model(cfg.motion, data_root))
        result = torch.from_numpy(extract_motion(model, _resized(frames, 256)))
    elif step == "flame":
        from models.emoca import extract_flame, load_emoca

        model = load_emoca(ensure_model(cfg.flame, data_root))
        result = torch.from_numpy(extract_flame(model, _resized(frames, 224)))
    else:
        from models.dinov2 import embed_reference, load_dinov2

        encoder = load_dinov2(ensure_model(cfg.reference, data_root))
        result = embed_reference(encoder, frames[len(frames) // 2])["patch_tokens"]
    save_file({"x": result.contiguous()}, str(out))


def _resized(frames, size_px: int):
    """Crops at an extractor's input size (the stage cuts them from the clip; the model
    cost measured here is the same)."""
    import cv2
    import numpy as np

    size = (size_px, size_px)
    return np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])


def make_clips(root: Path, clips: int, frames: int, size: int) -> list:
    from tests.features_helpers import commit_clip

    return [commit_clip(root, f"clip{i}", frames, size, seed=i) for i in range(clips)]


def run_stage(
    root: Path, inputs: list, workers: int, own_pools: bool = False
) -> tuple[float, float, int]:
    """(seconds for inputs[workers:], warm-up seconds, items done) with a fresh pool."""
    from talkforge.config import ExecutionConfig, RayConfig
    from talkforge.executors import RayExecutor
    from tasks.base import Resources, StageEnv
    from tasks.features import FeaturesStage
    from tasks.features_config import ExtractorPools, FeaturesConfig
    from tasks.runner import WorkItem

    config = FeaturesConfig(resources=Resources(num_workers=workers, batch_size=16))
    if own_pools:
        quarter = {"num_cpus": 0.25, "num_workers": 1}
        pools = ExtractorPools(placement="own_pools")
        pools = pools.model_copy(
            update={
                name: getattr(pools, name).model_copy(update=quarter)
                for name in ("vae_latents", "liveportrait_motion", "emoca_flame", "reference",
                             "hubert", "sensevoice")
            }
        )  # fmt: skip
        config = FeaturesConfig(
            resources=Resources(num_cpus=0.5, num_workers=workers, batch_size=16), pools=pools
        )
    env = StageEnv(data_root=str(root), store_uri=str(root / "store"), run_id="bench")
    executor = RayExecutor(RayConfig(num_cpus=os.cpu_count()), ExecutionConfig())
    items = [WorkItem(item_id=x.item_id, item_key=f"k{w}" * 20, attempt=1, inputs=x)
             for w, x in enumerate(inputs)]  # fmt: skip
    done: list = []
    started = time.perf_counter()
    for actor_warm in range(workers):  # every actor loads its models on its first item
        executor.run(FeaturesStage, config, env, [items[actor_warm]], done.append)
    warm_s = time.perf_counter() - started
    started = time.perf_counter()
    executor.run(FeaturesStage, config, env, items[workers:], done.append)
    elapsed = time.perf_counter() - started
    executor.release("features")
    ok = sum(o.status == "done" for o in done)
    return elapsed, warm_s, ok


def run_naive(root: Path, inputs: list, work: Path) -> float:
    from storage.store import ArtifactStore

    store = ArtifactStore(str(root / "store"))
    work.mkdir()
    started = time.perf_counter()
    for x in inputs:
        crops = store._path(x.records["faces"].crops.uri)
        wav = store._path(x.records["download"].audio.uri)
        for step in NAIVE_STEPS:
            subprocess.run(
                [sys.executable, __file__, "--naive-step", step, "--root", str(root),
                 "--crops", crops, "--wav", wav, "--out", str(work / f"{x.item_id}-{step}.st")],
                check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )  # fmt: skip
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--frames", type=int, default=75)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--naive-step", choices=NAIVE_STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--crops", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--wav", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive_step:
        naive_step(args.naive_step, args.root, args.crops, args.wav, Path(args.out))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tf-bench-feat-") as tmp_name:
        root = Path(tmp_name)
        inputs = make_clips(root, args.clips + 2, args.frames, args.size)
        from models.registry import ensure_model
        from tasks.base import StageEnv
        from tasks.features import FeaturesStage
        from tasks.features_config import FeaturesConfig

        env = StageEnv(data_root=str(root), store_uri=str(root / "store"), run_id="b")
        for spec in FeaturesStage(FeaturesConfig(), env).model_specs():
            ensure_model(spec, root)  # tiny models built once, outside every timing
        one_s, warm1_s, done1 = run_stage(root, inputs[1:], 1)
        two_s, warm2_s, done2 = run_stage(root, inputs, 2)
        pools_s, warm3_s, done3 = run_stage(root, inputs[1:], 1, own_pools=True)
        naive_s = run_naive(root, inputs[2:], root / "naive")
    n = args.clips
    result = {
        "clips": n,
        "frames_per_clip": args.frames,
        "crop_px": args.size,
        "naive_s": round(naive_s, 2),
        "stage_1_worker_s": round(one_s, 2),
        "stage_2_workers_s": round(two_s, 2),
        "stage_own_pools_s": round(pools_s, 2),
        "pool_warmup_s": [round(warm1_s, 2), round(warm2_s, 2), round(warm3_s, 2)],
        "naive_clips_per_s": round(n / naive_s, 3),
        "stage_1_worker_clips_per_s": round(n / one_s, 3),
        "stage_2_workers_clips_per_s": round(n / two_s, 3),
        "stage_2_workers_over_naive": round(naive_s / two_s, 2),
        "two_over_one_worker": round(one_s / two_s, 2),
        "own_pools_over_in_worker": round(two_s / pools_s, 2),
        "items_done": [done1, done2, done3],
        "cpus": os.cpu_count(),
    }
    (out / "bench_features.json").write_text(json.dumps(result, indent=2))
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    return 0 if done1 == done3 == n + 1 and done2 == n + 2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
