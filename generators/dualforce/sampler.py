"""Autoregressive generation with the per-frame Diffusion Forcing schedule (§3.2, §6.1.1).

Frame by frame: every past frame is clean (σ = 0, its keys/values in the cache), the
current frame is denoised over ``steps_per_frame`` Euler steps (video σ_v from 1 to 0,
structure σ_s from ``struct_start_sigma`` to 0 on the same grid scaled, so structure is always
the cleaner stream — "structure first, appearance second"), and future frames do not exist
yet (pure noise: the model is causal, so they could not influence the current frame
anyway). After the last step the clean frame is run once more at σ = 0 with ``commit=True``,
which stores exactly the keys/values a full causal forward over clean past frames would
compute. The structure stream starts from ``struct_start_sigma · ε`` (the clean component's
expectation is the projector's zero-mean latent).

Optional classifier-free guidance on audio runs the conditional and the audio-dropped
branches as one batch of ``2B`` with one cache, ``v = v_u + w·(v_c − v_u)``.

``use_cache=False`` is the reference implementation: the full causal forward over every frame
so far at every step (what the cache replaces). Both give the same frames (tests), and
:mod:`benchmarks.bench_dualforce` times one against the other. With a ``sink``, frames are
handed over as they are finished and nothing grows with the length but the positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from generators.dualforce.config import SamplerConfig
from generators.dualforce.model import DualForceInputs, DualForceTransformer

FrameSink = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass
class GenerationResult:
    """Generated ``latents (B, T, C, H, W)``, structure latents ``(B, T, d_s)`` and FLAME
    ``(B, T, 159)`` (standardised, the projector's units); empty when a sink took them."""

    latents: torch.Tensor
    structure: torch.Tensor
    flame: torch.Tensor


def sigma_grid(steps: int, shift: float) -> torch.Tensor:
    """``steps + 1`` noise levels from 1 to 0, shifted ``sσ / (1 + (s − 1)σ)`` (SD3/Wan)."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


@dataclass
class _Frame:
    video: torch.Tensor  # (B, 1, C, H, W)
    struct: torch.Tensor  # (B, 1, d_s)


class AutoregressiveSampler:
    """Generates ``num_frames`` from a reference and audio with a :class:`DualForceTransformer`."""

    def __init__(self, model: DualForceTransformer, cfg: SamplerConfig):
        self.model, self.cfg = model, cfg
        self.grid = sigma_grid(cfg.steps_per_frame, cfg.shift)

    def _predict(
        self,
        frames: list[_Frame],
        current: _Frame,
        sv: float,
        ss: float,
        reference,
        audio,
        keep,
        cache,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Velocities of the current frame at (σ_v, σ_s); past ``frames`` are clean."""
        b = current.video.shape[0]
        if cache is not None:
            t, video, struct = 1, current.video, current.struct
            audio_now = audio[:, cache.frames_committed : cache.frames_committed + 1]
        else:
            t = len(frames) + 1
            video = torch.cat([f.video for f in frames] + [current.video], 1)
            struct = torch.cat([f.struct for f in frames] + [current.struct], 1)
            audio_now = audio[:, :t]
        sig_v = torch.zeros(b, t).to(video)
        sig_s = torch.zeros(b, t).to(video)
        sig_v[:, -1], sig_s[:, -1] = sv, ss
        inp = DualForceInputs(video, sig_v, reference, struct, sig_s, audio_now, keep)
        out = self.model.step(inp, cache, False) if cache is not None else self.model(inp)
        assert out.struct_velocity is not None
        return out.video_velocity[:, -1:], out.struct_velocity[:, -1:]

    def _guided(self, *args) -> tuple[torch.Tensor, torch.Tensor]:
        v, s = self._predict(*args)
        w = self.cfg.audio_guidance
        if w == 1.0:
            return v, s
        half = v.shape[0] // 2
        return (v[half:] + w * (v[:half] - v[half:]), s[half:] + w * (s[:half] - s[half:]))

    @torch.no_grad()
    def generate(
        self,
        reference: torch.Tensor,
        audio: torch.Tensor,
        latent_shape: tuple[int, int, int],
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        sink: FrameSink | None = None,
    ) -> GenerationResult:
        """``reference (B, N_r, D_r)``, ``audio (B, T, 2, D_a)``: one frame per audio frame."""
        a, cfg = self.model.arch, self.cfg
        b, num_frames = audio.shape[:2]
        guided = cfg.audio_guidance != 1.0
        keep = None
        if guided:
            reference = torch.cat([reference, reference])
            audio = torch.cat([audio, audio])
            keep = torch.cat([torch.ones(b), torch.zeros(b)]).to(audio)
        cache = self.model.new_cache() if use_cache else None
        past: list[_Frame] = []
        kept: list[_Frame] = []
        for t in range(num_frames):
            v = torch.randn(b, 1, *latent_shape, generator=generator).to(audio)
            s = torch.randn(b, 1, a.struct_latent_dim, generator=generator).to(audio)
            s = s * cfg.struct_start_sigma
            for k in range(cfg.steps_per_frame):
                sv, sv_next = float(self.grid[k]), float(self.grid[k + 1])
                ss, ss_next = cfg.struct_start_sigma * sv, cfg.struct_start_sigma * sv_next
                both = _Frame(torch.cat([v, v]), torch.cat([s, s])) if guided else _Frame(v, s)
                dv, ds = self._guided(past, both, sv, ss, reference, audio, keep, cache)
                v = v + (sv_next - sv) * dv
                s = s + (ss_next - ss) * ds
            clean = _Frame(torch.cat([v, v]), torch.cat([s, s])) if guided else _Frame(v, s)
            if cache is not None:
                zeros = torch.zeros(clean.video.shape[0], 1).to(audio)
                self.model.step(
                    DualForceInputs(
                        clean.video,
                        zeros,
                        reference,
                        clean.struct,
                        zeros,
                        audio[:, t : t + 1],
                        keep,
                    ),
                    cache,
                    commit=True,
                )
            else:
                past.append(clean)
            flame = self.model.flame_head(s)
            if sink is not None:
                sink(t, v[:, 0], s[:, 0], flame[:, 0])
            else:
                kept.append(_Frame(v, torch.cat([s, flame], -1)))
        if not kept:
            empty = torch.empty(b, 0)
            return GenerationResult(empty, empty, empty)
        struct_flame = torch.cat([f.struct for f in kept], 1)
        d = a.struct_latent_dim
        return GenerationResult(
            torch.cat([f.video for f in kept], 1), struct_flame[..., :d], struct_flame[..., d:]
        )
