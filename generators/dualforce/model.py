"""The DualForce transformer: a causal multi-modal DiT over video latents and structure latents.

Inputs (:class:`DualForceInputs`, the features stage's tensors): noisy VAE latents
``(B, T, C, H, W)`` at per-frame σ_v, noisy structure latents ``(B, T, d_s)`` (stage 1's
projection of the LivePortrait motion) at per-frame σ_s, HuBERT ``(B, T, 2, D_a)`` (steps
``2i, 2i+1`` of frame ``i``), DINOv2 patch tokens ``(B, N, D_r)`` of the reference frame and
that frame's VAE latent ``(B, C, H, W)``. Audio and reference are clean conditioning.

Outputs (:class:`DualForceOutput`): video velocity, structure velocity (flow-matching sign
convention in :mod:`generators.dualforce.objectives`) and FLAME parameters (standardised)
regressed by an independent head from the predicted clean structure
``x̂_s = x̃_s − σ_s · v̂_s``.

``forward`` runs a whole clip under the block-causal mask (training, and the reference for
tests); ``step`` runs one frame against a :class:`~generators.dualforce.cache.DualForceCache`
and, with ``commit=True``, appends that frame's keys/values. Frame ``i`` of ``forward`` and
the ``i``-th committed ``step`` see the same keys, so they agree to float rounding.
``structure=None`` / ``audio=None`` drop that stream (stage 2's video-only model).

Wan correspondences: ``patch_embed`` (``Conv3d`` with a ``(1, ph, pw)`` patch), the
per-block ``scale_shift_table`` + per-token time projection (Wan 2.2 TI2V's per-token
timesteps, here per frame), ``norm_out`` / ``scale_shift_table`` / ``proj_out`` head and its
unpatchify order, ``image_embedder`` (Wan I2V's CLIP-image embedder, here for DINOv2).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanImageEmbedding
from torch import nn
from torch.utils.checkpoint import checkpoint

from generators.dualforce.blocks import DualForceBlock, StreamState
from generators.dualforce.cache import DualForceCache
from generators.dualforce.config import DualForceArch
from generators.dualforce.layers import Rope, SigmaEmbedding, block_causal_mask, rotary


@dataclass
class DualForceInputs:
    video: torch.Tensor  # (B, T, C, H, W) noisy latents
    sigma_video: torch.Tensor  # (B, T)
    reference_tokens: torch.Tensor  # (B, N, image_dim) DINOv2 patch tokens
    reference_latent: torch.Tensor | None = None  # (B, C, H, W) clean reference frame
    structure: torch.Tensor | None = None  # (B, T, d_s) noisy structure latents
    sigma_struct: torch.Tensor | None = None  # (B, T)
    audio: torch.Tensor | None = None  # (B, T, steps, D_a) HuBERT
    audio_keep: torch.Tensor | None = None  # (B,) 1 = audio on, 0 = dropped (CFG)
    frame_offset: int = 0


@dataclass
class DualForceOutput:
    video_velocity: torch.Tensor
    struct_velocity: torch.Tensor | None
    flame: torch.Tensor | None


class _Head(nn.Module):
    """Wan's output head: ``norm_out``, (shift, scale) = table + the stream's σ embedding,
    ``proj_out``."""

    def __init__(self, dim: int, out_features: int, eps: float, tokens: int | None = None):
        super().__init__()
        self.flatten = tokens is not None  # one output per frame from all its tokens
        self.norm_out = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 1, 2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim * (tokens or 1), out_features)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table + temb[:, :, None].float()).unbind(2)
        h = (self.norm_out(x.float()) * (1 + scale[:, :, None]) + shift[:, :, None]).type_as(x)
        return self.proj_out(h.flatten(2) if self.flatten else h)


class LipHeads(nn.Module):
    """Embeddings for §6.3.4's contrastive lip-sync loss: the mouth box of a latent frame
    (adaptive-pooled to 4×4) and the frame's pooled HuBERT, both into ``lip_embed_dim``."""

    def __init__(self, arch: DualForceArch):
        super().__init__()
        e = arch.lip_embed_dim
        self.box = arch.mouth_box
        self.mouth = nn.Sequential(nn.Linear(arch.in_channels * 16, e), nn.SiLU(), nn.Linear(e, e))
        self.audio = nn.Sequential(
            nn.LayerNorm(arch.audio_dim), nn.Linear(arch.audio_dim, e), nn.SiLU(), nn.Linear(e, e)
        )

    def mouth_embedding(self, latents: torch.Tensor) -> torch.Tensor:
        b, t, _, h, w = latents.shape
        top, bottom, left, right = self.box
        r0, c0 = int(top * h), int(left * w)
        crop = latents[..., r0 : max(r0 + 1, round(bottom * h)), c0 : max(c0 + 1, round(right * w))]
        pooled = F.adaptive_avg_pool2d(crop.flatten(0, 1), (4, 4)).flatten(1)
        return self.mouth(pooled).unflatten(0, (b, t))

    def audio_embedding(self, hubert: torch.Tensor) -> torch.Tensor:
        return self.audio(hubert.mean(2))


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.SiLU(), nn.Linear(hidden, out))


class DualForceTransformer(nn.Module):
    """See the module docstring. Build with a :class:`DualForceArch`."""

    def __init__(self, arch: DualForceArch):
        super().__init__()
        a = self.arch = arch
        _, ph, pw = a.patch_size
        self.patch_embed = nn.Conv3d(a.in_channels, a.dim, a.patch_size, stride=a.patch_size)
        self.video_modality = nn.Parameter(torch.randn(a.dim) * 0.02)
        self.sigma_video = SigmaEmbedding(a.freq_dim, a.dim)
        self.video_head = _Head(a.dim, a.in_channels * ph * pw, a.eps)
        self.image_embedder = WanImageEmbedding(a.image_dim, a.dim)
        self.reference_modality = nn.Parameter(torch.randn(a.dim) * 0.02)

        sd, ns = a.struct_dim, a.struct_tokens_per_frame
        self.struct_tokenizer = _mlp(a.struct_latent_dim, 2 * sd, ns * sd)
        self.struct_modality = nn.Parameter(torch.randn(sd) * 0.02)
        self.sigma_struct = SigmaEmbedding(a.freq_dim, sd)
        self.struct_reference = nn.Linear(a.dim, sd)
        self.struct_head = _Head(sd, a.struct_latent_dim, a.eps, tokens=ns)
        self.flame_head = _mlp(a.struct_latent_dim, a.flame_head_dim, a.flame_dim)

        self.audio_proj = nn.Sequential(
            nn.LayerNorm(a.audio_dim),
            nn.Linear(a.audio_dim, a.audio_tokens_per_frame * a.audio_token_dim),
        )
        self.audio_modality = nn.Parameter(torch.randn(a.audio_token_dim) * 0.02)
        self.lip = LipHeads(a)
        self.blocks = nn.ModuleList(
            DualForceBlock(i, a, shallow=i < a.fusion_depth) for i in range(a.num_layers)
        )
        self.gradient_checkpointing = False  # recompute each block in backward (training)

    # -- token embedding -------------------------------------------------------------------

    def _patches(self, video: torch.Tensor) -> torch.Tensor:
        """``(B, T, C, H, W)`` → ``(B, T, N, dim)`` through Wan's ``Conv3d`` patch embedding."""
        x = self.patch_embed(video.transpose(1, 2).to(self.patch_embed.weight.dtype))
        return x.flatten(3).permute(0, 2, 3, 1)

    def _video_tokens(self, video: torch.Tensor, offset: int) -> tuple[torch.Tensor, Rope]:
        a = self.arch
        _, ph, pw = a.patch_size
        _, t, _, h, w = video.shape
        tokens = self._patches(video) + self.video_modality
        gh, gw = h // ph, w // pw
        frames = (torch.arange(t) + offset).repeat_interleave(gh * gw)
        rows = torch.arange(gh).repeat_interleave(gw).repeat(t)
        cols = torch.arange(gw).repeat(gh * t)
        cos, sin = rotary(a.attention_head_dim, frames, rows, cols, a.rope_theta)
        return tokens, (cos.to(video.device), sin.to(video.device))

    def _struct_tokens(self, structure: torch.Tensor, offset: int) -> tuple[torch.Tensor, Rope]:
        a = self.arch
        t = structure.shape[1]
        tokens = self.struct_tokenizer(structure).unflatten(-1, (a.struct_tokens_per_frame, -1))
        frames = (torch.arange(t) + offset).repeat_interleave(a.struct_tokens_per_frame)
        zeros = torch.zeros_like(frames)
        cos, sin = rotary(a.struct_head_dim, frames, zeros, zeros, a.rope_theta)
        return tokens + self.struct_modality, (cos.to(structure.device), sin.to(structure.device))

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

    def reference_context(
        self, patch_tokens: torch.Tensor, latent: torch.Tensor | None
    ) -> torch.Tensor:
        """``(B, g² [+ N_v], dim)``: DINOv2 patch tokens average-pooled to a ``g × g`` grid
        through Wan's image embedder, then the reference latent's patches (if enabled)."""
        a = self.arch
        b, n, d = patch_tokens.shape
        side = round(n**0.5)
        if side * side != n or d != a.image_dim:
            raise ValueError(f"reference tokens must be (B, s², {a.image_dim}), got {(b, n, d)}")
        grid = patch_tokens.transpose(1, 2).reshape(b, d, side, side)
        pooled = F.adaptive_avg_pool2d(grid.float(), a.reference_grid).flatten(2).transpose(1, 2)
        ctx = self.image_embedder(pooled.to(self.reference_modality.dtype))
        if a.reference_latent:
            if latent is None:
                raise ValueError("this model reads the reference frame's latent; none given")
            ctx = torch.cat([ctx, self._patches(latent[:, None])[:, 0]], 1)
        return ctx + self.reference_modality

    # -- forward ---------------------------------------------------------------------------

    def _run(
        self, inp: DualForceInputs, cache: DualForceCache | None, commit: bool
    ) -> DualForceOutput:
        a = self.arch
        _, t, c, h, w = inp.video.shape
        whole_clip = cache is None and t > 1
        v_tokens, v_rope = self._video_tokens(inp.video, inp.frame_offset)
        temb_v, mod_v = self.sigma_video(inp.sigma_video)
        reference = None  # a cache holds every block's reference keys/values after one step
        if cache is None or not cache.reference:
            reference = self.reference_context(inp.reference_tokens, inp.reference_latent)
        v_mask = None
        if whole_clip:
            v_mask = block_causal_mask(t, v_tokens.shape[2], a.window_frames, v_tokens.device)
        video = StreamState(v_tokens, mod_v, v_rope, v_mask, reference)
        struct = None
        if inp.structure is not None:
            if inp.sigma_struct is None:
                raise ValueError("structure given without sigma_struct")
            s_tokens, s_rope = self._struct_tokens(inp.structure, inp.frame_offset)
            temb_s, mod_s = self.sigma_struct(inp.sigma_struct)
            s_mask = None
            if whole_clip:
                s_mask = block_causal_mask(t, s_tokens.shape[2], a.window_frames, s_tokens.device)
            s_ref = self.struct_reference(reference) if reference is not None else None
            struct = StreamState(s_tokens, mod_s, s_rope, s_mask, s_ref)
        audio = self.audio_tokens(inp.audio) if inp.audio is not None else None
        checkpointed = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointed:
                v, s = checkpoint(block, video, struct, audio, inp.audio_keep, use_reentrant=False)
            else:
                v, s = block(video, struct, audio, inp.audio_keep, cache, commit)
            video = replace(video, tokens=v)
            if struct is not None:
                struct = replace(struct, tokens=s)
        video_velocity = self._unpatchify(self.video_head(video.tokens, temb_v), c, h, w)
        struct_velocity = flame = None
        if struct is not None and inp.structure is not None and inp.sigma_struct is not None:
            struct_velocity = self.struct_head(struct.tokens, temb_s)
            clean = inp.structure - inp.sigma_struct[..., None] * struct_velocity
            flame = self.flame_head(clean)
        if cache is not None and commit:
            cache.frames_committed += 1
        return DualForceOutput(video_velocity, struct_velocity, flame)

    def _unpatchify(self, x: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
        """Wan's order: ``proj_out`` features are (pt, ph, pw, C) per patch."""
        _, ph, pw = self.arch.patch_size
        b, t = x.shape[:2]
        x = x.reshape(b, t, h // ph, w // pw, ph, pw, c).permute(0, 1, 6, 2, 4, 3, 5)
        return x.reshape(b, t, c, h, w)

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


_BACKBONE_PREFIXES = (
    "patch_embed.",
    "video_modality",
    "sigma_video.",
    "video_head.",
    "image_embedder.",
    "reference_modality",
)


def is_backbone_param(name: str) -> bool:
    """True for the video backbone's parameters (a transformer-relative name): what stage 2
    trains and stage 3 adapts with LoRA. Everything else is a new module of stage 3."""
    if name.startswith("blocks."):
        return name.split(".")[2] == "video"
    return name.startswith(_BACKBONE_PREFIXES)


def parameter_count(arch: DualForceArch) -> dict[str, int]:
    """Parameters of a model of ``arch``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = DualForceTransformer(arch)
    backbone = sum(p.numel() for n, p in model.named_parameters() if is_backbone_param(n))
    total = sum(p.numel() for p in model.parameters())
    return {"total": total, "video_backbone": backbone, "new_modules": total - backbone}
