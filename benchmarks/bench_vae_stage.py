"""VAE encode throughput inside the features stage against the bare model forward.

    .venv/bin/python benchmarks/bench_vae_stage.py [--device cuda] [--batch 32] [--clips 6]

Both contenders use the same VAE at the same batch size in the same run:

- **bare**: ``vae.encode(x).latent_dist.mode()`` on batches already on the device (no
  decode, no copies, no normalisation), the device synchronised before the clock stops;
  the model's ceiling.
- **stage**: ``FeaturesStage.process`` on every clip (crops decoded from mp4, VAE under
  the stage's autocast policy, latents normalised, copied back and written as safetensors,
  plus the audio extractor the stage always runs), with every other video extractor
  disabled, so the figure is the VAE path's.

The VAE is FLUX.1-layout at full size (``--full-size``, default on CUDA: 128-256-512-512
channels, 2 layers per block, random weights built from config; no download), or the
tiny test model. Figures: frames/s of each and stage / bare (target ≥ 0.80 on a GPU).
Written to ``<out>/bench_vae_stage.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_full_flux1(directory: Path) -> None:
    """FLUX.1 VAE architecture (as published in its config) with random weights."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False, sample_size=1024,
    ).save_pretrained(directory)  # fmt: skip


def bare_fps(vae, frames, batch: int, device) -> float:
    import torch

    x = torch.from_numpy(frames).permute(0, 3, 1, 2).to(device, torch.float32) / 127.5 - 1.0
    with torch.inference_mode():
        vae.encode(x[:batch]).latent_dist.mode()  # warm-up (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for start in range(0, len(x), batch):
            vae.encode(x[start : start + batch]).latent_dist.mode()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return len(x) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--full-size", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--amp-dtype", default="bfloat16", choices=["bfloat16", "float16", "none"])
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import torch

    from models.registry import ModelSpec, fingerprint
    from models.vae import load_vae
    from tasks.base import ItemContext, Resources, StageEnv
    from tasks.features import FeaturesStage
    from tasks.features_config import ExtractorPools, FeaturesConfig
    from tests.features_helpers import commit_clip, face_frames

    device = torch.device(args.device)
    full = args.full_size if args.full_size is not None else device.type == "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tf-bench-vae-") as tmp_name:
        root = Path(tmp_name)
        vae_spec = ModelSpec(family="vae-flux1", source="models/vae-flux1-tiny", tiny_random=True)
        if full:
            build_full_flux1(root / "vae-full")
            vae_spec = ModelSpec(family="vae-flux1", source=str(root / "vae-full"))
        config = FeaturesConfig(
            vae=vae_spec, motion=None, flame=None, reference=None, sensevoice=None,
            amp_dtype=args.amp_dtype,
            resources=Resources(num_gpus=int(device.type == "cuda"), batch_size=args.batch),
            pools=ExtractorPools(vae_latents=Resources(batch_size=args.batch)),
        )  # fmt: skip
        inputs = [
            commit_clip(root, f"c{i}", args.frames, args.size, seed=i) for i in range(args.clips)
        ]
        env = StageEnv(data_root=str(root), store_uri=str(root / "store"), run_id="b")
        prints = {s.family: fingerprint(s, root) for s in FeaturesStage(config, env).model_specs()}
        stage = FeaturesStage(config, env.model_copy(update={"model_fingerprints": prints}))
        stage.setup()

        def run_clip(i: int, x) -> None:
            ctx = ItemContext(env.store(), "features", x.item_id, f"{i:040d}")
            stage.process(x, ctx)
            ctx.close()

        run_clip(0, inputs[0])  # warm-up, as the bare side gets one
        started = time.perf_counter()
        for i, x in enumerate(inputs[1:], start=1):
            run_clip(i, x)
        stage_fps = (args.clips - 1) * args.frames / (time.perf_counter() - started)
        vae = load_vae(stage.pools["vae_latents"].worker.source, device=device)
        amp = stage.pools["vae_latents"].worker.autocast()  # the stage's precision policy
        frames = np.concatenate([face_frames(args.frames, args.size, seed=i) for i in range(3)])
        with amp:
            bare = bare_fps(vae, frames, args.batch, device)
    result = {
        "device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
        "vae": "FLUX.1 layout, full size, random weights" if full else "tiny test VAE",
        "batch": args.batch,
        "crop_px": args.size,
        "amp_dtype": args.amp_dtype if device.type == "cuda" else "none (CPU)",
        "bare_forward_fps": round(bare, 1),
        "stage_fps": round(stage_fps, 1),
        "stage_over_bare": round(stage_fps / bare, 3),
        "target_stage_over_bare": 0.80,
    }
    (out / "bench_vae_stage.json").write_text(json.dumps(result, indent=2))
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    raise SystemExit(main())
