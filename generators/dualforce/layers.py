"""Building blocks of the DualForce DiT: rotary positions, attention, σ embeddings, gates.

Reused from diffusers' Wan 2.x transformer: ``WanAttention`` (``to_q/to_k/to_v/to_out``, RMS
q/k norm across heads) for every stream's self- and reference attention,
``WanImageEmbedding`` for the DINOv2 reference tokens (Wan I2V's image embedder),
``FP32LayerNorm``, ``FeedForward``, ``Timesteps`` / ``TimestepEmbedding`` and
``get_1d_rotary_pos_embed``. Written here, because Wan has no equivalent: attention over
cached keys/values (Wan's processor runs one full sequence), cross-modal attention between
streams of different widths (:class:`BridgeAttention`, MOVA's bridge), per-frame σ
modulation with zero-initialised projections (AdaLN-Zero), and positions from explicit
indices.

Positions follow Wan's 3D RoPE split (head channels into time / height / width bands,
``h = w = 2·(d // 6)``, time gets the rest), computed from explicit indices rather than
Wan's fixed 1024-position table, so frame 10 000 of an autoregressive run gets the same
rotation as in a full forward. Every modality that attends over time uses the same time band
with its frame index: the one temporal position encoding they share. Structure tokens sit
at spatial position (0, 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_wan import WanAttention
from torch import nn

Rope = tuple[torch.Tensor, torch.Tensor]


def rope_bands(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of one head's channels into (time, height, width) rotary bands."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rotary(
    head_dim: int, frames: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, theta: float
) -> Rope:
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


def _rotate(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` ``(B, H, S, d)`` (Wan's convention)."""
    cos, sin = rope
    work = x if x.dtype == torch.float64 else x.float()
    x1, x2 = work.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


def block_causal_mask(
    num_frames: int, tokens_per_frame: int, window: int, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean ``(T·N, T·N)``: query frame ``i`` may read key frame ``j`` iff
    ``i - window < j <= i``; all tokens of one frame see each other."""
    frame = torch.arange(num_frames, device=device)
    diff = frame[:, None] - frame[None, :]
    allowed = (diff >= 0) & (diff < window)  # per frame pair, then expanded to tokens
    return allowed.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


def _heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def queries(attn: nn.Module, x: torch.Tensor, rope: Rope | None = None) -> torch.Tensor:
    """Queries ``(B, H, S, d)`` of ``x`` ``(B, S, dim)`` through a Wan-layout attention."""
    q = _heads(attn, attn.norm_q(attn.to_q(x)))
    return _rotate(q, rope) if rope is not None else q


def keys_values(
    attn: nn.Module, context: torch.Tensor, rope: Rope | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``(B, H, S_kv, d)`` of ``context``, keys rotated by ``rope`` if given."""
    k = _heads(attn, attn.norm_k(attn.to_k(context)))
    v = _heads(attn, attn.to_v(context))
    return (_rotate(k, rope) if rope is not None else k), v


def attend(
    attn: nn.Module,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(qkᵀ/√d)v`` through ``to_out``: ``(B, S, dim)``."""
    out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
    out = out.transpose(1, 2).flatten(-2).type_as(q)
    for layer in attn.to_out:
        out = layer(out)
    return out


class BridgeAttention(nn.Module):
    """Cross-attention from one stream (width ``dim``) to another (width ``kv_dim``), in
    Wan's parameter layout (MOVA's bridge between towers of different widths)."""

    def __init__(self, dim: int, heads: int, head_dim: int, kv_dim: int, eps: float):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(kv_dim, inner)
        self.to_v = nn.Linear(kv_dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])
        self.norm_q = nn.RMSNorm(inner, eps=eps)
        self.norm_k = nn.RMSNorm(inner, eps=eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return attend(self, queries(self, x), *keys_values(self, context))


def wan_attention(dim: int, heads: int, head_dim: int, eps: float, cross: bool) -> WanAttention:
    """A diffusers ``WanAttention`` of width ``dim`` (self- or cross-attention layout)."""
    return WanAttention(
        dim=dim,
        heads=heads,
        dim_head=head_dim,
        eps=eps,
        cross_attention_dim_head=head_dim if cross else None,
    )


class SigmaEmbedding(nn.Module):
    """σ ∈ [0, 1] per frame → Wan's ``Timesteps`` (on ``1000·σ``) + ``TimestepEmbedding``, then
    SiLU and a **zero-initialised** projection to ``6 × dim`` (AdaLN-Zero: every block's
    shift/scale/gate start at its table, whose gates are zero).

    Returns ``(temb (B, T, dim), modulation (B, T, 6, dim))``.
    """

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.timesteps_proj = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedder = TimestepEmbedding(freq_dim, dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.time_proj.weight)
        nn.init.zeros_(self.time_proj.bias)

    def forward(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = sigma.shape
        freqs = self.timesteps_proj(sigma.flatten() * 1000.0)
        temb = self.time_embedder(freqs.to(self.time_embedder.linear_1.weight.dtype))
        mod = self.time_proj(self.act_fn(temb)).unflatten(-1, (6, -1))
        return temb.unflatten(0, (b, t)), mod.unflatten(0, (b, t))


class Gate(nn.Module):
    """Zero-initialised per-channel gate ``tanh(g)·x`` on a cross-modal path: the path starts
    switched off exactly (``tanh(0) = 0``) and opens as ``g`` learns."""

    def __init__(self, dim: int):
        super().__init__()
        self.g = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.g).to(x.dtype) * x
