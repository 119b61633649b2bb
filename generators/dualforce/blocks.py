"""One DualForce DiT block: two Wan-layout streams and, in shallow blocks, gated fusion.

Each stream (:class:`WanStream`) has the sublayers of diffusers' ``WanTransformerBlock``, same
names and order: ``norm1`` → ``attn1`` (self-attention, here block-causal over time) gated by
AdaLN, ``norm2`` → ``attn2`` (cross-attention to the reference tokens, Wan's text/image
slot, ungated as in Wan), ``norm3`` → ``ffn`` gated by AdaLN, modulated per frame through
``scale_shift_table + modulation``. The video stream is modulated by σ_v's embedding, the
structure stream by σ_s's (dual AdaLN-Zero: separate tables, separate σ embeddings, gates
zero at initialisation).

Shallow blocks (index < ``fusion_depth``) add :class:`Fusion` between ``attn2`` and the FFN:
§6.2.1's within-frame pattern — structure ↔ video both ways, audio → structure and
audio → video one way, each path through a zero-initialised
:class:`~generators.dualforce.layers.Gate`. Fusion attends per frame (``(B·T, N, ·)``), so
cross-modal attention only ever reads the current frame and needs no cache. Audio and
reference tokens are inputs of every block and are never updated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.normalization import FP32LayerNorm
from torch import nn

from generators.dualforce.cache import DualForceCache, KVSlot
from generators.dualforce.config import DualForceArch
from generators.dualforce.layers import (
    BridgeAttention,
    Gate,
    Rope,
    attend,
    keys_values,
    queries,
    wan_attention,
)

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class StreamState:
    """One stream entering a block: tokens ``(B, T, N, D)``, AdaLN modulation ``(B, T, 6, D)``,
    rotary cos/sin of its ``T·N`` tokens, the block-causal mask (``None`` in a cached step)
    and the reference context ``(B, N_r, D)`` in the stream's width (``None`` once a cache
    holds its keys/values)."""

    tokens: torch.Tensor
    modulation: torch.Tensor
    rope: Rope
    mask: torch.Tensor | None
    reference: torch.Tensor | None


class WanStream(nn.Module):
    """The sublayers of a ``WanTransformerBlock`` for one stream (see the module docstring)."""

    def __init__(self, dim: int, heads: int, head_dim: int, ffn_dim: int, arch: DualForceArch):
        super().__init__()
        eps = arch.eps
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = wan_attention(dim, heads, head_dim, eps, cross=False)
        self.attn2 = wan_attention(dim, heads, head_dim, eps, cross=True)
        self.norm2 = (
            FP32LayerNorm(dim, eps, elementwise_affine=True) if arch.cross_attn_norm else None
        )
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        table = torch.randn(1, 1, 6, dim) / dim**0.5  # Wan's init ...
        table[:, :, (2, 5)] = 0.0  # ... with AdaLN-Zero gates
        self.scale_shift_table = nn.Parameter(table)

    def reference_kv(self, reference: torch.Tensor) -> KV:
        return keys_values(self.attn2, reference)

    def attention(
        self, x: StreamState, reference_kv: KV, slot: KVSlot | None, commit: bool
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Self-attention and reference cross-attention; returns (tokens, FFN modulation)."""
        shift, scale, gate, c_shift, c_scale, c_gate = (
            self.scale_shift_table + x.modulation.float()
        ).unbind(2)
        h = x.tokens
        _, t, n, _ = h.shape
        normed = (self.norm1(h.float()) * (1 + scale[:, :, None]) + shift[:, :, None]).type_as(h)
        flat = normed.flatten(1, 2)
        q = queries(self.attn1, flat, x.rope)
        k, v = keys_values(self.attn1, flat, x.rope)
        if slot is None:
            out = attend(self.attn1, q, k, v, x.mask)
        else:
            if t != 1:
                raise ValueError(f"cached attention takes one frame at a time, got {t}")
            past_k, past_v = slot.read()
            if past_k is not None and past_v is not None:
                out = attend(self.attn1, q, torch.cat([past_k, k], 2), torch.cat([past_v, v], 2))
            else:
                out = attend(self.attn1, q, k, v)
            if commit:
                slot.write(k, v)
        h = (h.float() + out.unflatten(1, (t, n)) * gate[:, :, None]).type_as(h)
        ctx = self.norm2(h.float()).type_as(h) if self.norm2 is not None else h
        h = h + attend(self.attn2, queries(self.attn2, ctx.flatten(1, 2)), *reference_kv).unflatten(
            1, (t, n)
        )
        return h, (c_shift, c_scale, c_gate)

    def feed_forward(self, h: torch.Tensor, mods: tuple[torch.Tensor, ...]) -> torch.Tensor:
        c_shift, c_scale, c_gate = mods
        normed = (self.norm3(h.float()) * (1 + c_scale[:, :, None]) + c_shift[:, :, None]).type_as(
            h
        )
        return (h.float() + self.ffn(normed).float() * c_gate[:, :, None]).type_as(h)


class Fusion(nn.Module):
    """Within-frame cross-modal attention of a shallow block, every path gated at zero."""

    def __init__(self, arch: DualForceArch):
        super().__init__()
        a = arch
        d, h, hd = a.dim, a.num_attention_heads, a.attention_head_dim
        sd, sh, shd, ad = a.struct_dim, a.struct_heads, a.struct_head_dim, a.audio_token_dim
        self.norm_video = FP32LayerNorm(d, a.eps)
        self.norm_struct = FP32LayerNorm(sd, a.eps)
        self.struct_to_video = BridgeAttention(d, h, hd, kv_dim=sd, eps=a.eps)
        self.audio_to_video = BridgeAttention(d, h, hd, kv_dim=ad, eps=a.eps)
        self.video_to_struct = BridgeAttention(sd, sh, shd, kv_dim=d, eps=a.eps)
        self.audio_to_struct = BridgeAttention(sd, sh, shd, kv_dim=ad, eps=a.eps)
        self.gate_struct_to_video = Gate(d)
        self.gate_audio_to_video = Gate(d)
        self.gate_video_to_struct = Gate(sd)
        self.gate_audio_to_struct = Gate(sd)

    def forward(
        self,
        video: torch.Tensor,
        struct: torch.Tensor | None,
        audio: torch.Tensor | None,
        audio_keep: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``video (B,T,Nv,D)``, ``struct (B,T,Ns,Ds)``, ``audio (B,T,Na,Da)``; both streams
        read the other's pre-fusion state, so the two directions are symmetric.
        ``audio_keep (B,)`` scales the audio paths per sample (0 = CFG's unconditional)."""
        b, t = video.shape[:2]

        def per_frame(x: torch.Tensor) -> torch.Tensor:
            return x.flatten(0, 1)

        def back(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(0, (b, t))

        keep = None if audio_keep is None else audio_keep.repeat_interleave(t)[:, None, None]

        def gated_audio(x: torch.Tensor) -> torch.Tensor:
            return x if keep is None else x * keep.to(x.dtype)

        vn = per_frame(self.norm_video(video))
        an = per_frame(audio) if audio is not None else None
        new_video = video
        new_struct = struct
        if struct is not None:
            sn = per_frame(self.norm_struct(struct))
            new_video = new_video + back(self.gate_struct_to_video(self.struct_to_video(vn, sn)))
            new_struct = struct + back(self.gate_video_to_struct(self.video_to_struct(sn, vn)))
            if an is not None:
                a2s = self.gate_audio_to_struct(self.audio_to_struct(sn, an))
                new_struct = new_struct + back(gated_audio(a2s))
        if an is not None:
            a2v = self.gate_audio_to_video(self.audio_to_video(vn, an))
            new_video = new_video + back(gated_audio(a2v))
        return new_video, new_struct


class DualForceBlock(nn.Module):
    """Video stream + structure stream (+ :class:`Fusion` when ``shallow``)."""

    def __init__(self, index: int, arch: DualForceArch, shallow: bool):
        super().__init__()
        a = arch
        self.index = index
        self.video = WanStream(a.dim, a.num_attention_heads, a.attention_head_dim, a.ffn_dim, a)
        self.struct = WanStream(
            a.struct_dim, a.struct_heads, a.struct_head_dim, a.struct_ffn_dim, a
        )
        self.fusion = Fusion(a) if shallow else None

    def _reference_kv(self, name: str, stream: WanStream, x: StreamState, cache) -> KV:
        key = (self.index, name)
        if cache is not None and key in cache.reference:
            return cache.reference[key]
        if x.reference is None:
            raise ValueError("no reference context and none cached")
        kv = stream.reference_kv(x.reference)
        if cache is not None:
            cache.reference[key] = kv
        return kv

    def forward(
        self,
        video: StreamState,
        struct: StreamState | None,
        audio: torch.Tensor | None,
        audio_keep: torch.Tensor | None = None,
        cache: DualForceCache | None = None,
        commit: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        v_slot = cache.video[self.index] if cache is not None else None
        v_kv = self._reference_kv("video", self.video, video, cache)
        v, v_ffn = self.video.attention(video, v_kv, v_slot, commit)
        s = s_ffn = None
        if struct is not None:
            s_slot = cache.struct[self.index] if cache is not None else None
            s_kv = self._reference_kv("struct", self.struct, struct, cache)
            s, s_ffn = self.struct.attention(struct, s_kv, s_slot, commit)
        if self.fusion is not None:
            v, s = self.fusion(v, s, audio, audio_keep)
        v = self.video.feed_forward(v, v_ffn)
        if s is not None and s_ffn is not None:
            s = self.struct.feed_forward(s, s_ffn)
        return v, s
