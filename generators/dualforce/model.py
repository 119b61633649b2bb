"""The DualForce transformer: causal multi-modal DiT over video latents and structure latents.

Inputs per clip (the features stage's contract, :class:`DualForceInputs`): noisy VAE latents
``(B, T, C, H, W)`` at per-frame σ_v, noisy structure latents ``(B, T, d_s)`` (stage 1's
projection of the 133 LivePortrait motion columns) at per-frame σ_s, HuBERT
``(B, T, 2, D_a)`` (steps ``2i, 2i+1`` of frame ``i``) and DINOv2 reference tokens
``(B, N_r, D_r)`` (CLS first, then patches). Audio and reference are clean conditioning.

Outputs (:class:`DualForceOutput`): video velocity, structure velocity (flow-matching sign
convention ``x̃ = (1 − σ)x + σε``, velocity ``dx̃/dσ = ε − x``, see
:mod:`generators.dualforce.objectives`) and FLAME parameters regressed from the predicted
clean structure ``x̂_s = x̃_s − σ_s · v̂_s``.

``forward`` runs a whole clip under the block-causal mask (training, and the reference for
tests); ``step`` runs one frame against a :class:`~generators.dualforce.cache.DualForceCache`
(generation) and, with ``commit=True``, appends that frame's keys/values. Frame ``i`` of
``forward`` and the ``i``-th committed ``step`` see the same keys, so they agree to float
rounding. ``structure=None`` / ``audio=None`` drop that stream (stage 2's video-only model;
CFG's unconditional branch).

Parameter groups: :func:`is_backbone_param` names the video backbone (what stage 2 trains and
stage 3 adapts with LoRA); everything else is a new module of stage 3.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from generators.dualforce.blocks import DualForceBlock, StreamInput
from generators.dualforce.cache import DualForceCache
from generators.dualforce.config import DualForceArch
from generators.dualforce.layers import SigmaEmbedding, rotary


@dataclass
class DualForceInputs:
    video: torch.Tensor
    sigma_video: torch.Tensor
    reference: torch.Tensor
    structure: torch.Tensor | None = None
    sigma_struct: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    audio_keep: torch.Tensor | None = None
    frame_offset: int = 0


@dataclass
class DualForceOutput:
    video_velocity: torch.Tensor
    struct_velocity: torch.Tensor | None
    flame: torch.Tensor | None


def patchify(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """``(B, T, C, H, W)`` → ``(B, T, (H/ph)(W/pw), C·ph·pw)``, channel order (c, dy, dx)."""
    b, t, c, h, w = x.shape
    if h % ph or w % pw:
        raise ValueError(f"latent size {h}x{w} is not a multiple of the patch {ph}x{pw}")
    x = x.reshape(b, t, c, h // ph, ph, w // pw, pw).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(b, t, (h // ph) * (w // pw), c * ph * pw)


def unpatchify(x: torch.Tensor, c: int, h: int, w: int, ph: int, pw: int) -> torch.Tensor:
    b, t = x.shape[:2]
    x = x.reshape(b, t, h // ph, w // pw, c, ph, pw).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(b, t, c, h, w)


class _Head(nn.Module):
    """Wan's output head: LN, (shift, scale) from the stream's σ embedding, zero-init linear."""

    def __init__(self, dim: int, in_features: int, out_features: int, eps: float, flatten: bool):
        super().__init__()
        self.eps, self.flatten = eps, flatten
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 1, 2, dim))
        self.proj_out = nn.Linear(in_features, out_features)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table + temb[:, :, None].float()).unbind(2)
        h = F.layer_norm(x.float(), x.shape[-1:], eps=self.eps)
        h = (h * (1 + scale[:, :, None]) + shift[:, :, None]).type_as(x)
        return self.proj_out(h.flatten(2) if self.flatten else h)


class LipHeads(nn.Module):
    """Embeddings for §6.3.4's contrastive lip-sync loss: the mouth box of a latent frame
    (adaptive-pooled to 4×4) and the frame's pooled HuBERT, both into ``lip_embed_dim``."""

    def __init__(self, arch: DualForceArch):
        super().__init__()
        e = arch.lip_embed_dim
        self.box = arch.mouth_box
        self.mouth = nn.Sequential(
            nn.Linear(arch.latent_channels * 16, e), nn.SiLU(), nn.Linear(e, e)
        )
        self.audio = nn.Sequential(
            nn.LayerNorm(arch.audio_dim), nn.Linear(arch.audio_dim, e), nn.SiLU(), nn.Linear(e, e)
        )

    def mouth_embedding(self, latents: torch.Tensor) -> torch.Tensor:
        b, t, _, h, w = latents.shape
        top, bottom, left, right = self.box
        crop = latents[
            ...,
            int(top * h) : max(int(top * h) + 1, round(bottom * h)),
            int(left * w) : max(int(left * w) + 1, round(right * w)),
        ]
        pooled = F.adaptive_avg_pool2d(crop.flatten(0, 1), (4, 4)).flatten(1)
        return self.mouth(pooled).unflatten(0, (b, t))

    def audio_embedding(self, hubert: torch.Tensor) -> torch.Tensor:
        return self.audio(hubert.mean(2))


class DualForceTransformer(nn.Module):
    """See the module docstring. Build with a :class:`DualForceArch`."""

    def __init__(self, arch: DualForceArch):
        super().__init__()
        a = self.arch = arch
        ph, pw = a.patch_size
        patch = a.latent_channels * ph * pw
        self.patch_embed = nn.Linear(patch, a.dim)
        self.video_modality = nn.Parameter(torch.randn(a.dim) * 0.02)
        self.sigma_video = SigmaEmbedding(a.freq_dim, a.dim)
        self.video_head = _Head(a.dim, a.dim, patch, a.eps, flatten=False)

        sd, ns = a.struct_dim, a.struct_tokens_per_frame
        self.struct_tokenizer = nn.Sequential(
            nn.Linear(a.struct_latent_dim, 2 * sd), nn.SiLU(), nn.Linear(2 * sd, ns * sd)
        )
        self.struct_modality = nn.Parameter(torch.randn(sd) * 0.02)
        self.sigma_struct = SigmaEmbedding(a.freq_dim, sd)
        self.struct_head = _Head(sd, ns * sd, a.struct_latent_dim, a.eps, flatten=True)
        self.flame_head = nn.Sequential(
            nn.Linear(a.struct_latent_dim, 256), nn.SiLU(), nn.Linear(256, a.flame_dim)
        )

        self.audio_proj = nn.Sequential(
            nn.LayerNorm(a.audio_dim),
            nn.Linear(a.audio_dim, a.audio_tokens_per_frame * a.audio_token_dim),
        )
        self.audio_modality = nn.Parameter(torch.randn(a.audio_token_dim) * 0.02)
        self.reference_norm = nn.LayerNorm(a.reference_dim)
        self.reference_modality = nn.Parameter(torch.randn(a.reference_dim) * 0.02)
        self.lip = LipHeads(a)
        self.blocks = nn.ModuleList(
            DualForceBlock(i, a, shallow=i < a.fusion_depth) for i in range(a.num_layers)
        )

    # -- token embedding -------------------------------------------------------------------

    def _video_tokens(self, video: torch.Tensor, offset: int):
        a = self.arch
        ph, pw = a.patch_size
        _, t, _, h, w = video.shape
        tokens = self.patch_embed(patchify(video, ph, pw)) + self.video_modality
        gh, gw = h // ph, w // pw
        frames = (torch.arange(t) + offset).repeat_interleave(gh * gw)
        rows = torch.arange(gh).repeat_interleave(gw).repeat(t)
        cols = torch.arange(gw).repeat(gh * t)
        cos, sin = rotary(a.attention_head_dim, frames, rows, cols, a.rope_theta)
        return tokens, (cos.to(video.device), sin.to(video.device))

    def _struct_tokens(self, structure: torch.Tensor, offset: int):
        a = self.arch
        _, t, _ = structure.shape
        tokens = self.struct_tokenizer(structure).unflatten(-1, (a.struct_tokens_per_frame, -1))
        tokens = tokens + self.struct_modality
        frames = (torch.arange(t) + offset).repeat_interleave(a.struct_tokens_per_frame)
        zeros = torch.zeros_like(frames)
        cos, sin = rotary(a.struct_head_dim, frames, zeros, zeros, a.rope_theta)
        return tokens, (cos.to(structure.device), sin.to(structure.device))

    def audio_tokens(self, audio: torch.Tensor) -> torch.Tensor:
        """HuBERT ``(B, T, steps, D_a)`` → ``(B, T, N_a, audio_token_dim)``: mean over the
        frame's steps, linear projection, audio modality embedding."""
        a = self.arch
        if audio.shape[2] != a.audio_steps_per_frame or audio.shape[-1] != a.audio_dim:
            raise ValueError(
                f"audio must be (B, T, {a.audio_steps_per_frame}, {a.audio_dim}), got "
                f"{tuple(audio.shape)}"
            )
        tokens = self.audio_proj(audio.mean(2)).unflatten(-1, (a.audio_tokens_per_frame, -1))
        return tokens + self.audio_modality

    def reference_tokens(self, reference: torch.Tensor) -> torch.Tensor:
        return self.reference_norm(reference) + self.reference_modality

    # -- forward ---------------------------------------------------------------------------

    def _run(
        self, inp: DualForceInputs, cache: DualForceCache | None, commit: bool
    ) -> DualForceOutput:
        a = self.arch
        _, _, c, h, w = inp.video.shape
        v_tokens, v_rope = self._video_tokens(inp.video, inp.frame_offset)
        temb_v, mod_v = self.sigma_video(inp.sigma_video)
        struct_in = None
        if inp.structure is not None:
            if inp.sigma_struct is None:
                raise ValueError("structure given without sigma_struct")
            s_tokens, s_rope = self._struct_tokens(inp.structure, inp.frame_offset)
            temb_s, mod_s = self.sigma_struct(inp.sigma_struct)
            struct_in = StreamInput(s_tokens, mod_s, s_rope)
        audio = self.audio_tokens(inp.audio) if inp.audio is not None else None
        reference = self.reference_tokens(inp.reference)
        video_in = StreamInput(v_tokens, mod_v, v_rope)
        for block in self.blocks:
            v, s = block(video_in, struct_in, audio, reference, inp.audio_keep, cache, commit)
            video_in = replace(video_in, tokens=v)
            if struct_in is not None:
                struct_in = replace(struct_in, tokens=s)
        ph, pw = a.patch_size
        video_velocity = unpatchify(self.video_head(video_in.tokens, temb_v), c, h, w, ph, pw)
        struct_velocity = flame = None
        if struct_in is not None and inp.structure is not None and inp.sigma_struct is not None:
            struct_velocity = self.struct_head(struct_in.tokens, temb_s)
            clean = inp.structure - inp.sigma_struct[..., None] * struct_velocity
            flame = self.flame_head(clean)
        if cache is not None and commit:
            cache.frames_committed += 1
        return DualForceOutput(video_velocity, struct_velocity, flame)

    def forward(self, inp: DualForceInputs) -> DualForceOutput:
        """Whole clip, block-causal over time (window ``arch.window_frames``)."""
        return self._run(inp, None, False)

    def new_cache(self) -> DualForceCache:
        return DualForceCache(self.arch.num_layers, self.arch.window_frames)

    def step(self, inp: DualForceInputs, cache: DualForceCache, commit: bool) -> DualForceOutput:
        """One frame (``T = 1``) at position ``cache.frames_committed``; ``commit`` stores it."""
        if inp.video.shape[1] != 1:
            raise ValueError("step takes exactly one frame")
        return self._run(replace(inp, frame_offset=cache.frames_committed), cache, commit)


def is_backbone_param(name: str) -> bool:
    """True for the video backbone's parameters (the Wan-style video stream)."""
    if name.startswith("blocks."):
        return name.split(".")[2] == "video"
    return name.startswith(("patch_embed.", "video_modality", "sigma_video.", "video_head."))


def parameter_count(arch: DualForceArch) -> dict[str, int]:
    """Parameters of a model of ``arch``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = DualForceTransformer(arch)
    backbone = sum(p.numel() for n, p in model.named_parameters() if is_backbone_param(n))
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "video_backbone": backbone, "new_modules": total - backbone}
