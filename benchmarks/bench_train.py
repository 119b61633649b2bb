"""Training throughput: the data loader against the step and a naive loader; 1 → 2 workers.

    .venv/bin/python benchmarks/bench_train.py [--clips 4] [--frames 64] [--batches 40]
    .venv/bin/python benchmarks/bench_train.py --device cuda [--family musetalk2] [--batch 16]

CPU part (all figures from this one run, same data, same tiny ``musetalk15`` model):

- **step**: the training step alone (forward, backward, AdamW) on batches already built, one
  thread, as one of two CPU training workers runs it: the rate the loader must sustain.
- **loader**: the stage's loader (:func:`tasks.train_loop.step_loader`, 2 loader processes,
  batches drawn from the clips' cached features in memory): samples/s into the step.
- **naive**: MuseTalk 1.5's approach with the same 2 loader processes: per sample, decode
  the target and reference frames from the clip's crops video (ffmpeg) and encode them with
  the VAE, then build the same batch.

  Targets: loader ≥ 5 × naive, loader ≥ step.
- **Ray Train 1 → 2 workers**: the real train stage on Ray Train with the same global batch,
  one worker with both CPUs against two workers with one CPU each: steps/s from each run's
  step history (median step time after warm-up). Target ≥ 1.6 ×.

CUDA part (``--device cuda``): the full-size network of ``--family`` (default musetalk15,
``musetalk2`` when registered) at ``--batch`` (the seed's stage-1 ``train_bs`` 16), bf16
autocast: median step time and peak GPU memory.

Written to ``<out>/bench_train.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from generators import registry  # noqa: E402
from generators.family_config import DataLayout  # noqa: E402
from generators.musetalk15.data import make_batch, step_picks  # noqa: E402
from tasks.train_loop import StepBatches, step_loader  # noqa: E402

SIZE = 128  # crop px: 16×16 latents with the tiny FLUX.1-layout VAE
BATCH = 8  # samples per step (one worker's share)


def build_world(root: Path, clips: int, frames: int) -> dict:
    from tests.train_helpers import build_bank, commit_clip, make_env, split_ids, tiny_vae

    torch.manual_seed(0)
    env = make_env(root)
    vae, vae_fp = tiny_vae(root)
    ids, _ = split_ids(clips, 0)
    made = [commit_clip(root, env, vae, vae_fp, c, frames, SIZE, seed=i) for i, c in enumerate(ids)]
    return {"root": root, "env": env, "vae": vae, "clips": made, "bank": build_bank(env, made)}


def feature_clips(world: dict) -> list:
    from generators.family_config import FeatureClip

    store, root = world["env"].store(), world["root"]
    out = []
    for c in world["clips"]:
        feats = c.inputs.records["features"]
        paths = {f.family: str(store.local_path(f.artifact.uri, root)) for f in feats.files}
        out.append(FeatureClip(clip_id=c.clip_id, num_frames=feats.num_frames, paths=paths))
    return out


class NaiveBatches(torch.utils.data.Dataset):
    """MuseTalk 1.5's loader: every sample decodes its frames and VAE-encodes them."""

    def __init__(self, world: dict, data, seed: int, count: int):
        store = world["env"].store()
        self.videos = [
            store.local_path(c.inputs.records["faces"].crops.uri, world["root"])
            for c in world["clips"]
        ]
        self.vae, self.data, self.seed, self.count = world["vae"], data, seed, count

    def __len__(self) -> int:
        return self.count

    def _frames(self, video: Path, wanted: list[int]) -> dict[int, np.ndarray]:
        from tasks.media import iter_frames

        got, n = {}, 0
        for chunk in iter_frames(video, SIZE, SIZE, chunk=16):
            for frame in chunk:
                if n in wanted:
                    got[n] = frame
                n += 1
            if len(got) == len(set(wanted)):
                break
        return got

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from models.vae import encode_frames

        picks = step_picks(self.data.frame_counts, self.seed, i + 1, BATCH)
        clips = []
        for c, t, r in picks:  # decode + encode per sample, as MuseTalk 1.5 does
            frames = self._frames(self.videos[c], [t, r])
            lat = encode_frames(self.vae, np.stack([frames[t], frames[r]]), batch_size=2)
            clips.append((lat, c, t, r))
        real = self.data.clips  # this loader process's copy: the fresh latents replace them
        for lat, c, t, r in clips:
            real[c].latents[t] = lat[0].to(real[c].latents.dtype)
            real[c].latents[r] = lat[1].to(real[c].latents.dtype)
        x, tokens, target = make_batch(real, picks, self.data.window_frames)
        return {"input": x, "audio": tokens, "target": target}


def rate(loader, batches: int) -> float:
    it = iter(loader)
    next(it)  # start-up (process fork, first batch) is not throughput
    started = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * BATCH / (time.perf_counter() - started)


def step_rate(family, spec, data, batches: int) -> float:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = family.build(spec).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    built = [family.training_batch(data, 0, s + 1, BATCH, 0, BATCH) for s in range(batches + 1)]
    times = []
    for batch in built:
        started = time.perf_counter()
        family.training_step(model, batch)["loss"].backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - started)
    return BATCH / statistics.median(times[1:])


def ray_steps_per_s(world: dict, workers: int, steps: int) -> float:
    from talkforge.ray_train import RayTrainLauncher
    from tasks.base import ItemContext
    from tasks.train import TrainStage
    from tasks.train_config import train_config
    from tests.train_helpers import train_inputs

    cfg = train_config(
        steps=steps,
        checkpoint_every=steps,
        batch_size=2 * BATCH // workers,  # the same global batch
        data_workers=1,
        resources={"num_workers": workers, "num_cpus": 2 // workers},
    )
    stage = TrainStage(cfg, world["env"])
    stage.trainer = RayTrainLauncher()
    ctx = ItemContext(world["env"].store(), "train", "train", f"{workers}" * 40)
    try:
        rec = stage.process(train_inputs(world["clips"], world["bank"]), ctx)
    finally:
        ctx.close()
    step_s = [2 * BATCH / h.samples_per_s for h in rec.history[3:]]  # after warm-up
    return 1.0 / statistics.median(step_s)


def cpu_part(args: argparse.Namespace, root: Path) -> dict:
    world = build_world(root, args.clips, args.frames)
    family = registry.instantiate(_cfg("musetalk15", "tiny"))
    layout = DataLayout(shapes={"vae_latents": [16, 16, 16], "hubert": [2, 32]})
    spec = family.make_spec(layout)
    clips = feature_clips(world)
    bank_path = str(world["env"].store().local_path(world["bank"].bank.uri, root))
    data = family.load_training_data(spec, clips, bank_path)

    out = {"step_samples_per_s": step_rate(family, spec, data, args.batches)}
    ours = StepBatches(family, data, 0, 1, args.batches + 1, BATCH, (0, BATCH))
    out["loader_samples_per_s"] = rate(step_loader(ours, workers=2), args.batches)
    naive = NaiveBatches(world, data, 0, args.naive_batches + 1)
    loader = torch.utils.data.DataLoader(
        naive, batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    out["naive_samples_per_s"] = rate(loader, args.naive_batches)
    out["loader_over_naive"] = out["loader_samples_per_s"] / out["naive_samples_per_s"]
    out["loader_over_step"] = out["loader_samples_per_s"] / out["step_samples_per_s"]
    if not args.skip_ray:
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        one = ray_steps_per_s(world, 1, args.ray_steps)
        two = ray_steps_per_s(world, 2, args.ray_steps)
        ray.shutdown()
        out.update(ray_1_worker_steps_per_s=one, ray_2_workers_steps_per_s=two)
        out["ray_2_over_1"] = two / one
    return out


def _cfg(family: str, unet: str):
    from tasks.train_config import train_config

    return train_config(family=family, unet=unet)


def cuda_part(args: argparse.Namespace) -> dict:
    """Full-size step time and peak memory (random latents/audio of the real shapes)."""
    device = torch.device("cuda")
    family = registry.instantiate(_cfg(args.family, "full"))
    if args.family == "musetalk15":  # FLUX.1 latents of 256 px crops, HuBERT-base audio
        layout = DataLayout(shapes={"vae_latents": [16, 32, 32], "hubert": [2, 768]})
    else:
        layout = DataLayout(shapes=json.loads(args.layout))
    spec = family.make_spec(layout)
    torch.manual_seed(0)
    model = family.build(spec).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = synthetic_batch(family, spec, layout, args.batch, device)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.cuda_steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = family.training_step(model, batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    params = sum(p.numel() for p in model.parameters())
    return {
        "family": args.family,
        "params": params,
        "batch": args.batch,
        "step_s_median": statistics.median(times[2:]),
        "samples_per_s": args.batch / statistics.median(times[2:]),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "gpu": torch.cuda.get_device_name(),
    }


def synthetic_batch(family, spec, layout, batch: int, device) -> dict:
    """A batch of the family's training shapes (musetalk15: built by its own batch code)."""
    if family.name != "musetalk15":
        raise SystemExit("--device cuda for other families needs their batch builder")
    c, h, w = layout.shapes["vae_latents"]
    steps, dim = layout.shapes["hubert"]
    tokens = (2 * spec.audio_window_frames + 1) * steps
    return {
        "input": torch.randn(batch, 3 * c, h, w, device=device),
        "audio": torch.randn(batch, tokens, dim, device=device),
        "target": torch.randn(batch, c, h, w, device=device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--naive-batches", type=int, default=6)
    parser.add_argument("--ray-steps", type=int, default=30)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--family", default="musetalk15")
    parser.add_argument("--layout", default="{}", help="JSON DataLayout shapes (not musetalk15)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cuda-steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    args = parser.parse_args()
    if args.device == "cuda":
        result = cuda_part(args)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
            result = cpu_part(args, Path(tmp))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_train.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
