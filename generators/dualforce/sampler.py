"""Autoregressive generation with the per-frame Diffusion Forcing schedule (§3.2, §6.1.1).

Frame by frame: every past frame is clean (σ = 0, its keys/values in the cache), the current
frame is denoised over ``steps_per_frame`` Euler steps (video σ_v from 1 to 0, structure σ_s
from ``struct_start_sigma`` to 0 on the same grid, scaled, so structure is always the cleaner
stream — "structure first, appearance second"), and future frames are pure noise: the model
is causal, so they cannot influence the current frame and are not computed. After the last
step the clean frame is run once more at σ = 0 with ``commit=True``, which stores exactly the
keys/values a full causal forward over clean past frames computes. The structure stream
starts from ``struct_start_sigma · ε`` (the projector's latents are zero-mean per frame).

Optional classifier-free guidance on audio runs the conditional and the audio-dropped
branches as one batch of ``2B`` with one cache: ``v = v_u + w·(v_c − v_u)``.

:class:`GenerationSession` hands out one finished frame per :meth:`~GenerationSession.next_frame`
call, so a caller streams frames out and memory holds only the weights, the cache (at most
``window_frames − 1`` frames per block and stream) and one frame's activations, however long
the sequence. ``use_cache=False`` is the reference implementation — the full causal forward
over every frame so far at every step, what the cache replaces — kept for the tests and
:mod:`benchmarks.bench_dualforce`; its memory grows with the length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from generators.dualforce.config import SamplerConfig
from generators.dualforce.model import DualForceInputs, DualForceTransformer


def sigma_grid(steps: int, shift: float) -> torch.Tensor:
    """``steps + 1`` noise levels from 1 to 0, shifted ``sσ / (1 + (s − 1)σ)`` (SD3/Wan)."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift * s / (1 + (shift - 1) * s)


@dataclass
class Frame:
    """One generated frame: latents ``(B, C, H, W)``, structure latent ``(B, d_s)`` and FLAME
    ``(B, 159)`` (standardised, the projector's units)."""

    video: torch.Tensor
    structure: torch.Tensor
    flame: torch.Tensor


class GenerationSession:
    """One autoregressive run over ``audio``'s frames (see the module docstring)."""

    def __init__(
        self,
        model: DualForceTransformer,
        cfg: SamplerConfig,
        reference_tokens: torch.Tensor,
        reference_latent: torch.Tensor | None,
        audio: torch.Tensor,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ):
        self.model, self.cfg, self.generator = model, cfg, generator
        self.grid = sigma_grid(cfg.steps_per_frame, cfg.shift).tolist()
        self.batch, self.num_frames = audio.shape[:2]
        self.guided = cfg.audio_guidance != 1.0
        self.keep: torch.Tensor | None = None
        if self.guided:  # rows [0, B): with audio; [B, 2B): audio dropped
            reference_tokens = torch.cat([reference_tokens, reference_tokens])
            if reference_latent is not None:
                reference_latent = torch.cat([reference_latent, reference_latent])
            audio = torch.cat([audio, audio])
            ones = torch.ones(self.batch, device=audio.device, dtype=audio.dtype)
            self.keep = torch.cat([ones, torch.zeros_like(ones)])
        self.reference_tokens, self.reference_latent, self.audio = (
            reference_tokens, reference_latent, audio,
        )  # fmt: skip
        self.cache = model.new_cache() if use_cache else None
        self.past: list[tuple[torch.Tensor, torch.Tensor]] = []  # (video, struct) without cache
        self.t = 0

    def _inputs(
        self, video: torch.Tensor, struct: torch.Tensor, sv: float, ss: float
    ) -> DualForceInputs:
        """Inputs for the current frame at (σ_v, σ_s); without a cache, all frames so far."""
        t = self.t
        if self.cache is None:
            video = torch.cat([v for v, _ in self.past] + [video], 1)
            struct = torch.cat([s for _, s in self.past] + [struct], 1)
            audio = self.audio[:, : t + 1]
        else:
            audio = self.audio[:, t : t + 1]
        n = video.shape[1]
        sig_v = torch.zeros(video.shape[0], n, dtype=video.dtype, device=video.device)
        sig_s = torch.zeros_like(sig_v)
        sig_v[:, -1], sig_s[:, -1] = sv, ss
        return DualForceInputs(
            video, sig_v, self.reference_tokens, self.reference_latent, struct, sig_s, audio,
            self.keep,
        )  # fmt: skip

    def _velocity(
        self, video: torch.Tensor, struct: torch.Tensor, sv: float, ss: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inp = self._inputs(video, struct, sv, ss)
        if self.cache is not None:
            out = self.model.step(inp, self.cache, commit=False)
        else:
            out = self.model(inp)
        if out.struct_velocity is None:
            raise RuntimeError("generation needs the structure stream")
        dv, ds = out.video_velocity[:, -1:], out.struct_velocity[:, -1:]
        if self.guided:
            w, b = self.cfg.audio_guidance, self.batch
            dv = torch.cat([dv[b:] + w * (dv[:b] - dv[b:])] * 2)
            ds = torch.cat([ds[b:] + w * (ds[:b] - ds[b:])] * 2)
        return dv, ds

    @torch.no_grad()
    def next_frame(self) -> Frame:
        """Denoise frame ``t`` (the next one), commit it, return it (conditional rows only)."""
        if self.t >= self.num_frames:
            raise IndexError(f"all {self.num_frames} frames are generated")
        a, cfg = self.model.arch, self.cfg
        rows = 2 * self.batch if self.guided else self.batch
        shape = (self.batch, 1, a.in_channels, a.latent_height, a.latent_width)
        dev, dt = self.audio.device, self.audio.dtype
        v = torch.randn(shape, generator=self.generator).to(dev, dt)
        s = torch.randn(self.batch, 1, a.struct_latent_dim, generator=self.generator).to(dev, dt)
        s = s * cfg.struct_start_sigma
        if self.guided:  # both branches share the frame's noise
            v, s = torch.cat([v, v]), torch.cat([s, s])
        for k in range(cfg.steps_per_frame):
            sv, sv_next = self.grid[k], self.grid[k + 1]
            ss, ss_next = cfg.struct_start_sigma * sv, cfg.struct_start_sigma * sv_next
            dv, ds = self._velocity(v, s, sv, ss)
            v = v + (sv_next - sv) * dv
            s = s + (ss_next - ss) * ds
        if self.cache is not None:
            self.model.step(self._inputs(v, s, 0.0, 0.0), self.cache, commit=True)
        else:
            self.past.append((v, s))
        self.t += 1
        assert v.shape[0] == rows
        v, s = v[: self.batch, 0], s[: self.batch, 0]
        return Frame(v, s, self.model.flame_head(s))


@dataclass
class GenerationResult:
    """Generated ``latents (B, T, C, H, W)``, structure latents ``(B, T, d_s)`` and FLAME
    ``(B, T, 159)``."""

    latents: torch.Tensor
    structure: torch.Tensor
    flame: torch.Tensor


@torch.no_grad()
def generate(
    model: DualForceTransformer,
    cfg: SamplerConfig,
    reference_tokens: torch.Tensor,
    reference_latent: torch.Tensor | None,
    audio: torch.Tensor,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> GenerationResult:
    """All of ``audio``'s frames ``(B, T, steps, D_a)``, stacked (memory grows with ``T`` by
    the outputs; stream with :class:`GenerationSession` to avoid that)."""
    session = GenerationSession(
        model, cfg, reference_tokens, reference_latent, audio, generator, use_cache
    )
    frames = [session.next_frame() for _ in range(session.num_frames)]
    return GenerationResult(
        torch.stack([f.video for f in frames], 1),
        torch.stack([f.structure for f in frames], 1),
        torch.stack([f.flame for f in frames], 1),
    )
