"""DualForce generation: KV-cached autoregression against recomputing the causal forward.

    .venv/bin/python benchmarks/bench_dualforce.py [--frames 64 256] [--memory-frames 64 512]
        [--steps-per-frame 2] [--threads 1] [--device cuda]

CPU figures (the tiny preset on ``--latent`` latents, default 4×16×16 → 64 video tokens per
frame at the 2×2 patch, 8-frame window), each pair measured in the same run with the same
weights, noise and audio:

- **speed**: seconds per generated frame with the KV cache (one frame's tokens per step
  against the cached keys/values) and without it (the full block-causal forward over every
  frame so far at every denoising step — what the cache replaces), at each ``--frames``
  length. The cached run generates every frame; the recompute run is timed at
  ``--samples`` evenly spaced frame indices ``t`` (its session is given ``t`` clean past
  frames, then generates frame ``t``; its cost does not depend on their values), whose mean
  is the run's mean per-frame time. Reported: the ratio (target ≥ 5× at 64 frames) and the
  least-squares slope of per-frame time against ``t`` for both (the cached one should be
  flat: ``relative_growth`` = slope × length / mean). Because other load on the machine
  drifts over a run, flatness is also measured interleaved: two cached runs, one just past
  the window and one near the end, advanced frame by frame in alternation (``--rounds``
  pairs); the ratio of their median frame times and the slope between them.
- **memory**: peak resident memory of generating ``--memory-frames`` frames, streamed (each
  frame handed out as it is finished, as the generate stage does), each length in a fresh
  child process: its peak RSS (``VmHWM``), the growth of the peak during generation (peak
  reset after loading the model and generating one frame), the ratio of the two lengths, and
  what the fixed part is made of (weights, the KV cache per modality, allocated once at
  ``window_frames − 1`` frames; the audio input, the one thing that scales with length).

``--device cuda`` adds the seed-size figures (the ``mova_lite`` preset: 28 blocks of width
2048, 8 shallow; 256-px crops → 16×32×32 latents, 256 video tokens per frame): a stage-3
training step (2 clips × 32 frames, bf16 autocast, gradient checkpointing, LoRA 64/32, AdamW
with the two learning rates) — time and peak memory, halving the clip length until it fits —
and generation frames/s with the cache (20 Euler steps per frame, bf16 weights).
Written to ``<out>/bench_dualforce.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

AUDIO_DIM, REF_TOKENS, REF_DIM = 16, 16, 12


def tiny_spec(steps_per_frame: int, latent: tuple[int, int, int]):
    from generators.dualforce.config import DualForceConfig
    from generators.dualforce.family import DualForceFamily
    from generators.family_config import DataLayout

    shapes = {
        "vae_latents": list(latent), "hubert": [2, AUDIO_DIM], "liveportrait_motion": [133],
        "emoca_flame": [159], "reference": [REF_TOKENS, REF_DIM],
    }  # fmt: skip
    cfg = DualForceConfig(training_stage="stage3", sampler={"steps_per_frame": steps_per_frame})
    return DualForceFamily(cfg).make_spec(DataLayout(shapes=shapes))


def tiny_model(spec):
    """The tiny transformer with every zero-initialised weight set (as after training)."""
    import torch

    from generators.dualforce.model import DualForceTransformer

    torch.manual_seed(0)
    model = DualForceTransformer(spec.arch).eval()
    with torch.no_grad():
        for p in model.parameters():
            zeros = p == 0
            p[zeros] = torch.randn(int(zeros.sum())) * 0.1
    return model


def conditioning(spec, frames: int):
    import torch

    a = spec.arch
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(1, REF_TOKENS, REF_DIM, generator=g),
        torch.randn(1, a.in_channels, a.latent_height, a.latent_width, generator=g),
        torch.randn(1, frames, 2, AUDIO_DIM, generator=g),
    )


def session(model, spec, frames: int, use_cache: bool):
    import torch

    from generators.dualforce.sampler import GenerationSession

    tokens, ref, audio = conditioning(spec, frames)
    return GenerationSession(
        model, spec.sampler, tokens, ref, audio, torch.Generator().manual_seed(2), use_cache
    )


def frame_time(run) -> float:
    started = time.perf_counter()
    run.next_frame()
    return time.perf_counter() - started


def recompute_at(model, spec, frames: int, t: int) -> float:
    """Time frame ``t`` of an uncached run whose ``t`` past frames are already clean."""
    import torch

    a = spec.arch
    run = session(model, spec, frames, use_cache=False)
    shape = (1, 1, a.in_channels, a.latent_height, a.latent_width)
    run.past = [(torch.randn(shape), torch.randn(1, 1, a.struct_latent_dim)) for _ in range(t)]
    run.t = t
    return frame_time(run)


def slope(ts: list[int], times: list[float]) -> float:
    """Least-squares slope of ``times`` against ``ts``."""
    n = len(times)
    mean_t, mean_y = sum(ts) / n, sum(times) / n
    cov = sum((t - mean_t) * (y - mean_y) for t, y in zip(ts, times, strict=True))
    return cov / sum((t - mean_t) ** 2 for t in ts)


def flatness(model, spec, frames: int, rounds: int) -> dict:
    """Cached per-frame time just past the window against near the end of a ``frames`` run,
    timed alternately (frame by frame) so both see the same machine load."""
    early_t = spec.arch.window_frames
    late_t = frames - rounds - 1
    early, late = session(model, spec, frames, True), session(model, spec, frames, True)
    for run, t in ((early, early_t), (late, late_t)):
        for _ in range(t):
            run.next_frame()
    pairs = [(frame_time(early), frame_time(late)) for _ in range(rounds)]
    med_early = statistics.median(e for e, _ in pairs)
    med_late = statistics.median(lt for _, lt in pairs)
    k = (med_late - med_early) / (late_t - early_t)
    print(f"{frames:4d} frames cached, interleaved: t={early_t}: {med_early * 1e3:.2f} ms, "
          f"t={late_t}: {med_late * 1e3:.2f} ms, slope {k * 1e6:+.2f} us/frame per t "
          f"(x{med_late / med_early:.3f})", flush=True)  # fmt: skip
    return {"t": [early_t, late_t], "median_s": [med_early, med_late], "slope": k,
            "late_over_early": med_late / med_early}  # fmt: skip


def speed(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    spec = tiny_spec(args.steps_per_frame, tuple(args.latent))
    model = tiny_model(spec)
    out = {"tokens_per_frame": spec.arch.tokens_per_frame, "threads": args.threads}
    with torch.inference_mode():
        warm = session(model, spec, 4, True)
        for _ in range(4):
            frame_time(warm)
        for frames in args.frames:
            run = session(model, spec, frames, True)
            cached = [frame_time(run) for _ in range(frames)]
            ts = [round(k * (frames - 1) / (args.samples - 1)) for k in range(args.samples)]
            recompute = [recompute_at(model, spec, frames, t) for t in ts]
            row = {}
            for name, t_values, times in (
                ("cached", list(range(frames)), cached), ("recompute", ts, recompute)
            ):  # fmt: skip
                mean = sum(times) / len(times)
                k = slope(t_values, times)
                row[name] = {
                    "s_per_frame": mean,
                    "slope_s_per_frame_per_t": k,
                    "relative_growth": k * frames / mean,
                    "t": t_values if name == "recompute" else None,
                    "times_s": times if name == "recompute" else None,
                }
                print(f"{frames:4d} frames {name:9s}: {mean * 1e3:8.2f} ms/frame, "
                      f"slope {k * 1e6:+9.2f} us/frame per t, "
                      f"growth over the run {k * frames / mean:+.1%}", flush=True)  # fmt: skip
            row["cached"]["interleaved"] = flatness(model, spec, frames, args.rounds)
            row["speedup"] = row["recompute"]["s_per_frame"] / row["cached"]["s_per_frame"]
            print(f"{frames:4d} frames: cache speed-up x{row['speedup']:.1f}", flush=True)
            out[str(frames)] = row
    return out


def _status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process (``/proc/self/status``, kB) in bytes. ``VmHWM`` is
    the peak of this process image; ``getrusage``'s maxrss also counts the parent the child
    was forked from, so it is not used."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5); False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _memory_child(frames: int, steps: int, latent, threads: int, queue) -> None:
    import torch

    from generators.dualforce.sampler import GenerationSession

    torch.set_num_threads(threads)
    spec = tiny_spec(steps, latent)
    model = tiny_model(spec)
    tokens, ref, audio = conditioning(spec, frames)
    with torch.inference_mode():
        warm = GenerationSession(model, spec.sampler, tokens, ref, audio[:, :1])
        warm.next_frame()  # kernels and allocator pools in place
        del warm
        reset = _reset_peak()
        baseline = _status_bytes("VmRSS") if reset else _status_bytes("VmHWM")
        session = GenerationSession(model, spec.sampler, tokens, ref, audio)
        for _ in range(frames):
            session.next_frame()  # streamed: the frame is dropped, as a sink would write it
        peak = _status_bytes("VmHWM")
        queue.put(
            {
                "peak_rss_bytes": peak,
                "growth_bytes": peak - baseline,
                "peak_reset": reset,
                "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                "cache_bytes": session.cache.nbytes(),
                "audio_input_bytes": audio.numel() * audio.element_size(),
            }
        )


def memory(args) -> dict:
    ctx = mp.get_context("spawn")
    out = {}
    for frames in args.memory_frames:
        queue = ctx.Queue()
        proc = ctx.Process(
            target=_memory_child,
            args=(frames, args.steps_per_frame, tuple(args.latent), args.threads, queue),
        )
        proc.start()
        out[str(frames)] = queue.get()
        proc.join()
        row = out[str(frames)]
        print(f"{frames:4d} frames: peak RSS {row['peak_rss_bytes'] / 2**20:.1f} MiB, growth "
              f"during generation {row['growth_bytes'] / 2**20:.2f} MiB, weights "
              f"{row['weights_bytes'] / 2**10:.0f} KiB, KV cache {row['cache_bytes']}, audio "
              f"input {row['audio_input_bytes'] / 2**10:.0f} KiB", flush=True)  # fmt: skip
    lo, hi = (out[str(f)] for f in (min(args.memory_frames), max(args.memory_frames)))
    out["peak_ratio"] = hi["peak_rss_bytes"] / lo["peak_rss_bytes"]
    out["growth_ratio"] = hi["growth_bytes"] / max(lo["growth_bytes"], 1)
    print(f"{max(args.memory_frames)} / {min(args.memory_frames)} frames: peak RSS "
          f"x{out['peak_ratio']:.3f}, growth x{out['growth_ratio']:.2f}", flush=True)  # fmt: skip
    return out


def gpu(args) -> dict:
    """Seed-size stage-3 step and cached generation on CUDA (see the module docstring)."""
    import numpy as np
    import torch

    from generators.dualforce.config import DualForceConfig
    from generators.dualforce.data import ClipTensors, TrainingData
    from generators.dualforce.family import DualForceFamily
    from generators.dualforce.network import for_inference
    from generators.dualforce.sampler import GenerationSession
    from generators.family_config import DataLayout

    dev = torch.device("cuda")
    shapes = {"vae_latents": [16, 32, 32], "hubert": [2, 1024], "liveportrait_motion": [133],
              "emoca_flame": [159], "reference": [256, 768]}  # fmt: skip
    out: dict = {}
    clip_frames = 32
    while clip_frames >= 4:
        cfg = DualForceConfig(training_stage="stage3", size="mova_lite", clip_frames=clip_frames)
        fam = DualForceFamily(cfg)
        spec = fam.make_spec(DataLayout(shapes=shapes))
        g = torch.Generator().manual_seed(0)
        clip = ClipTensors(
            "synthetic", torch.randn(64, 16, 32, 32, generator=g).half(),
            torch.randn(64, 133, generator=g), torch.randn(64, 159, generator=g),
            torch.randn(64, 2, 1024, generator=g), torch.randn(256, 768, generator=g), 1.0,
        )  # fmt: skip
        data = TrainingData(spec, [clip], np.ones(1), None, None)  # type: ignore[arg-type]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            model = fam.build(spec).to(dev)
            model.enable_gradient_checkpointing()
            lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
            new = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
            opt = torch.optim.AdamW([{"params": lora, "lr": 5e-5}, {"params": new, "lr": 1e-4}])
            times = []
            for step in range(6):
                batch = {
                    k: v.to(dev) for k, v in fam.training_batch(data, 0, step, 2, 0, 2).items()
                }
                torch.cuda.synchronize()
                started = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = fam.training_step(model, batch)["loss"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            out["train_step"] = {
                "clip_frames": clip_frames, "clips_per_step": 2,
                "s_per_step": sum(times[2:]) / len(times[2:]),
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                "trainable_params": sum(p.numel() for p in lora + new),
                "total_params": sum(p.numel() for p in model.parameters()),
            }  # fmt: skip
            print(json.dumps(out["train_step"]), flush=True)
            break
        except torch.OutOfMemoryError:
            print(f"stage 3 at {clip_frames} frames does not fit; halving", flush=True)
            model = opt = None
            clip_frames //= 2
    net = for_inference(model).require_transformer().to(torch.bfloat16)
    del opt
    torch.cuda.empty_cache()
    tokens = clip.reference[None].to(dev, torch.bfloat16)
    ref = clip.latents[:1].to(dev, torch.bfloat16)
    audio = clip.hubert[None, :40].to(dev, torch.bfloat16)
    with torch.inference_mode():
        session = GenerationSession(net, spec.sampler, tokens, ref, audio)
        for _ in range(8):
            session.next_frame()  # warm-up and past the first frames
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(32):
            session.next_frame()
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    out["generation"] = {
        "frames_per_s": 32 / elapsed, "steps_per_frame": spec.sampler.steps_per_frame,
        "cache_bytes": session.cache.nbytes(),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }  # fmt: skip
    print(json.dumps(out["generation"]), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--memory-frames", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--steps-per-frame", type=int, default=2)
    parser.add_argument("--latent", type=int, nargs=3, default=[4, 16, 16], help="C h w")
    parser.add_argument("--samples", type=int, default=8, help="recompute timing points")
    parser.add_argument("--rounds", type=int, default=16, help="interleaved flatness pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    result = {"speed": speed(args), "memory": memory(args)}
    if args.device == "cuda":
        result["cuda"] = gpu(args)
    path = args.out / "bench_dualforce.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
