"""One DualForce DiT block: two Wan-style streams and, in shallow blocks, gated fusion.

Each stream (:class:`StreamLayers`) is a Wan 2.x transformer block: AdaLN-modulated
block-causal temporal self-attention, cross-attention to the reference tokens (Wan's
``attn2`` slot, which reads text/image there), AdaLN-modulated FFN (diffusers
``FeedForward``, gelu-approximate). The video stream is modulated by σ_v, the structure
stream by σ_s (dual AdaLN-Zero: separate tables, separate σ embeddings, zero gates).

Shallow blocks (index < ``fusion_depth``) add :class:`Fusion`, §6.2.1's within-frame pattern:
structure ↔ video both ways, audio → structure and audio → video one way, every path
through a zero-initialised :class:`~generators.dualforce.layers.Gate`. Fusion attention is
per frame (``(B·T, N, ·)``): cross-modal attention only ever reads the current frame, so it
needs no cache. Audio and reference tokens are inputs of every block and never updated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention import FeedForward
from torch import nn

from generators.dualforce.cache import DualForceCache
from generators.dualforce.layers import Attention, Gate, TemporalSelfAttention, modulate


@dataclass
class StreamInput:
    """One stream's state entering a block: tokens ``(B, T, N, D)``, its AdaLN modulation
    ``(B, T, 6, D)`` and rotary cos/sin for its ``T·N`` tokens."""

    tokens: torch.Tensor
    modulation: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor]


class StreamLayers(nn.Module):
    """Wan-style sublayers of one stream (self-attention, reference cross-attention, FFN)."""

    def __init__(
        self, dim: int, heads: int, head_dim: int, ffn_dim: int, ref_dim: int, window: int, eps
    ):
        super().__init__()
        self.attn1 = TemporalSelfAttention(dim, heads, head_dim, window, eps)
        self.norm2 = nn.LayerNorm(dim, eps)
        self.attn2 = Attention(dim, heads, head_dim, kv_dim=ref_dim, eps=eps)
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        self.scale_shift_table = nn.Parameter(torch.zeros(1, 1, 6, dim))

    def attend(
        self,
        x: StreamInput,
        reference_kv: tuple[torch.Tensor, torch.Tensor],
        slot,
        commit: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention + reference cross-attention; returns (tokens, FFN modulation)."""
        shift, scale, gate, c_shift, c_scale, c_gate = (
            self.scale_shift_table + x.modulation.float()
        ).unbind(2)
        h = x.tokens
        attn = self.attn1.temporal(modulate(h, shift, scale), x.rope, slot, commit)
        h = h + gate[:, :, None] * attn
        _, t, n, _ = h.shape
        q = self.attn2.query(self.norm2(h).flatten(1, 2))
        h = h + self.attn2.attend(q, *reference_kv).unflatten(1, (t, n))
        return h, torch.stack((c_shift, c_scale, c_gate), 2)

    def feed_forward(self, h: torch.Tensor, ffn_mod: torch.Tensor) -> torch.Tensor:
        c_shift, c_scale, c_gate = ffn_mod.unbind(2)
        return h + c_gate[:, :, None] * self.ffn(modulate(h, c_shift, c_scale))


class Fusion(nn.Module):
    """Within-frame cross-modal attention of a shallow block, every path gated at zero."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        sdim: int,
        sheads: int,
        shead_dim: int,
        adim: int,
        eps: float,
    ):
        super().__init__()
        self.norm_video = nn.LayerNorm(dim, eps)
        self.norm_struct = nn.LayerNorm(sdim, eps)
        self.struct_to_video = Attention(dim, heads, head_dim, kv_dim=sdim, eps=eps)
        self.audio_to_video = Attention(dim, heads, head_dim, kv_dim=adim, eps=eps)
        self.video_to_struct = Attention(sdim, sheads, shead_dim, kv_dim=dim, eps=eps)
        self.audio_to_struct = Attention(sdim, sheads, shead_dim, kv_dim=adim, eps=eps)
        self.gate_struct_to_video = Gate(dim)
        self.gate_audio_to_video = Gate(dim)
        self.gate_video_to_struct = Gate(sdim)
        self.gate_audio_to_struct = Gate(sdim)

    def forward(
        self,
        video: torch.Tensor,
        struct: torch.Tensor | None,
        audio: torch.Tensor | None,
        audio_keep: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``video (B,T,Nv,D)``, ``struct (B,T,Ns,Ds)``, ``audio (B,T,Na,Da)``; both streams
        read the other's pre-fusion state, so the two directions are symmetric."""
        b, t = video.shape[:2]
        per_frame = lambda x: x.flatten(0, 1)  # noqa: E731
        back = lambda x: x.unflatten(0, (b, t))  # noqa: E731
        vn = per_frame(self.norm_video(video))
        sn = per_frame(self.norm_struct(struct)) if struct is not None else None
        an = per_frame(audio) if audio is not None else None
        keep = None if audio_keep is None else audio_keep.repeat_interleave(t)[:, None, None]
        new_video = video
        if sn is not None:
            new_video = new_video + back(self.gate_struct_to_video(self.struct_to_video(vn, sn)))
        if an is not None:
            a2v = self.gate_audio_to_video(self.audio_to_video(vn, an))
            new_video = new_video + back(a2v if keep is None else a2v * keep)
        new_struct = struct
        if struct is not None and sn is not None:
            new_struct = struct + back(self.gate_video_to_struct(self.video_to_struct(sn, vn)))
            if an is not None:
                a2s = self.gate_audio_to_struct(self.audio_to_struct(sn, an))
                new_struct = new_struct + back(a2s if keep is None else a2s * keep)
        return new_video, new_struct


class DualForceBlock(nn.Module):
    """Video stream + structure stream (+ fusion when ``shallow``)."""

    def __init__(self, index: int, arch, shallow: bool):
        super().__init__()
        a = arch
        self.index = index
        self.video = StreamLayers(
            a.dim,
            a.num_attention_heads,
            a.attention_head_dim,
            a.ffn_dim,
            a.reference_dim,
            a.window_frames,
            a.eps,
        )
        self.struct = StreamLayers(
            a.struct_dim,
            a.struct_heads,
            a.struct_head_dim,
            a.struct_ffn_dim,
            a.reference_dim,
            a.window_frames,
            a.eps,
        )
        self.fusion = (
            Fusion(
                a.dim,
                a.num_attention_heads,
                a.attention_head_dim,
                a.struct_dim,
                a.struct_heads,
                a.struct_head_dim,
                a.audio_token_dim,
                a.eps,
            )
            if shallow
            else None
        )

    def _reference_kv(self, stream: str, layers: StreamLayers, reference, cache):
        if cache is None:
            return layers.attn2.project_kv(reference)
        key = (self.index, stream)
        if key not in cache.reference:
            cache.reference[key] = layers.attn2.project_kv(reference)
        return cache.reference[key]

    def forward(
        self,
        video: StreamInput,
        struct: StreamInput | None,
        audio: torch.Tensor | None,
        reference: torch.Tensor,
        audio_keep: torch.Tensor | None = None,
        cache: DualForceCache | None = None,
        commit: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        v_slot = cache.video[self.index] if cache is not None else None
        v, v_ffn = self.video.attend(
            video, self._reference_kv("video", self.video, reference, cache), v_slot, commit
        )
        s = s_ffn = None
        if struct is not None:
            s_slot = cache.struct[self.index] if cache is not None else None
            s, s_ffn = self.struct.attend(
                struct,
                self._reference_kv("struct", self.struct, reference, cache),
                s_slot,
                commit,
            )
        if self.fusion is not None:
            v, s = self.fusion(v, s, audio, audio_keep)
        v = self.video.feed_forward(v, v_ffn)
        if s is not None and s_ffn is not None:
            s = self.struct.feed_forward(s, s_ffn)
        return v, s
