"""Building blocks of the DualForce DiT: rotary positions, attention, σ embeddings.

Positions follow Wan 2.x's 3D RoPE split (head dim into time / height / width bands,
``h = w = 2·(d // 6)``, time gets the rest; diffusers' ``get_1d_rotary_pos_embed``), but
positions are computed from explicit indices instead of a fixed table, so frame 10 000 of an
autoregressive run gets the same rotation as in a full forward. Every modality uses the same
time band with its frame index: that is the one temporal position encoding all modalities
share. Structure tokens sit at spatial position (0, 0).

Attention is ``F.scaled_dot_product_attention`` with Wan's RMS q/k norm across heads. The
temporal self-attention of each stream runs either over a whole clip with a block-causal,
``window_frames``-wide mask, or over one frame against a :class:`~generators.dualforce.cache.KVSlot`
(generation). Both give the same numbers: the mask admits exactly the frames the cache holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_1d_rotary_pos_embed
from torch import nn

from generators.dualforce.cache import KVSlot


def rope_bands(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of one head's channels into (time, height, width) rotary bands."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rotary(
    head_dim: int, frames: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``(S, head_dim)`` for tokens at (frame, row, col) positions, each ``(S,)``."""
    cos, sin = [], []
    for band, pos in zip(rope_bands(head_dim), (frames, rows, cols), strict=True):
        if band == 0:
            continue
        c, s = get_1d_rotary_pos_embed(
            band, pos.to(torch.float64), theta, use_real=True, freqs_dtype=torch.float64
        )
        cos.append(c)
        sin.append(s)
    return torch.cat(cos, dim=-1).float(), torch.cat(sin, dim=-1).float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` ``(B, H, S, d)`` by ``cos/sin`` ``(S, d)``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return out.flatten(-2).type_as(x)


def block_causal_mask(num_frames: int, tokens_per_frame: int, window: int) -> torch.Tensor:
    """Boolean ``(T·N, T·N)``: query frame ``i`` may read key frame ``j`` iff
    ``i - window < j <= i``; all tokens of one frame see each other."""
    frame = torch.arange(num_frames).repeat_interleave(tokens_per_frame)
    diff = frame[:, None] - frame[None, :]
    return (diff >= 0) & (diff < window)


class Attention(nn.Module):
    """Multi-head attention (Wan layout: ``to_q/to_k/to_v/to_out``, RMS q/k norm).

    ``kv_dim`` differs from ``dim`` for cross-modal attention between streams of different
    widths. Inputs are ``(B, S, dim)`` queries and ``(B, S_kv, kv_dim)`` keys/values.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, kv_dim: int | None = None, eps=1e-6):
        super().__init__()
        inner = heads * head_dim
        kv_dim = kv_dim or dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(kv_dim, inner)
        self.to_v = nn.Linear(kv_dim, inner)
        self.to_out = nn.Linear(inner, dim)
        self.norm_q = nn.RMSNorm(inner, eps=eps)
        self.norm_k = nn.RMSNorm(inner, eps=eps)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def project_kv(
        self, context: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, H, S_kv, d)`` of ``context``, rotated by ``rope`` if given."""
        k = self._split(self.norm_k(self.to_k(context)))
        v = self._split(self.to_v(context))
        if rope is not None:
            k = apply_rotary(k, *rope)
        return k, v

    def query(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        q = self._split(self.norm_q(self.to_q(x)))
        return apply_rotary(q, *rope) if rope is not None else q

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).flatten(-2))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        k, v = self.project_kv(x if context is None else context)
        return self.attend(self.query(x), k, v)


class TemporalSelfAttention(Attention):
    """Block-causal self-attention of one stream over time, with an optional KV cache.

    ``x`` is ``(B, T, N, dim)``. Without ``slot`` the whole clip is attended under
    :func:`block_causal_mask`. With ``slot`` (generation) ``T`` must be 1: the frame attends
    to the cached past frames plus itself, and ``commit=True`` stores its keys/values.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, window: int, eps: float = 1e-6):
        super().__init__(dim, heads, head_dim, eps=eps)
        self.window = window

    def temporal(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        slot: KVSlot | None = None,
        commit: bool = False,
    ) -> torch.Tensor:
        _, t, n, _ = x.shape
        flat = x.flatten(1, 2)
        q = self.query(flat, rope)
        k, v = self.project_kv(flat, rope)
        if slot is None:
            mask = block_causal_mask(t, n, self.window).to(x.device)
            out = self.attend(q, k, v, mask if t > 1 else None)
        else:
            if t != 1:
                raise ValueError(f"cached attention takes one frame at a time, got {t}")
            past_k, past_v = slot.read()
            if past_k is not None:
                out = self.attend(q, torch.cat([past_k, k], 2), torch.cat([past_v, v], 2))
            else:
                out = self.attend(q, k, v)
            if commit:
                slot.write(k, v)
        return out.unflatten(1, (t, n))


class SigmaEmbedding(nn.Module):
    """σ ∈ [0, 1] per frame → AdaLN modulation: Wan's ``Timesteps`` (on ``1000·σ``) +
    ``TimestepEmbedding`` + SiLU + a zero-initialised projection to ``chunks × dim``.

    Returns ``(temb (B, T, dim), modulation (B, T, chunks, dim))``. The projection is zero at
    initialisation (AdaLN-Zero): every block starts as the identity.
    """

    def __init__(self, freq_dim: int, dim: int, chunks: int = 6):
        super().__init__()
        self.chunks = chunks
        self.proj = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.embed = TimestepEmbedding(freq_dim, dim)
        self.act = nn.SiLU()
        self.to_mod = nn.Linear(dim, chunks * dim)
        nn.init.zeros_(self.to_mod.weight)
        nn.init.zeros_(self.to_mod.bias)

    def forward(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = sigma.shape
        freqs = self.proj(sigma.flatten() * 1000.0).to(self.embed.linear_1.weight.dtype)
        temb = self.embed(freqs)
        mod = self.to_mod(self.act(temb)).unflatten(-1, (self.chunks, -1))
        return temb.unflatten(0, (b, t)), mod.unflatten(0, (b, t))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``LN(x)·(1 + scale) + shift``; per-frame ``(B, T, dim)`` on tokens ``(B, T, N, dim)``."""
    normed = F.layer_norm(x.float(), x.shape[-1:], eps=1e-6)
    return (normed * (1 + scale[:, :, None]) + shift[:, :, None]).type_as(x)


class Gate(nn.Module):
    """Zero-initialised per-channel gate ``tanh(g)``: a cross-modal path starts switched off
    exactly (``tanh(0) = 0``) and opens as ``g`` learns."""

    def __init__(self, dim: int):
        super().__init__()
        self.g = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.g) * x
