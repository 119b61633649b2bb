"""Gated attention (Qiu et al. 2505.06708, Qwen) as a diffusers attention processor.

``Y' = Y ⊙ σ(X W_θ + b)`` at position G1: after ``softmax(QKᵀ)V`` and before the output
projection, with ``X`` the *query-side* hidden state that feeds ``Q`` (for cross-attention:
the visual tokens, not the audio), so the gate of token ``i`` depends on ``X_i`` alone.
``elementwise``: one gate per head and channel (``W_θ: d_model → H·d_head``); ``headwise``:
one per head (``W_θ: d_model → H``).

The processor is an ``nn.Module`` installed with ``unet.set_attn_processor``, so its gate
weights live in the UNet's state dict (``…attn1.processor.gate.weight``) and the diffusers
blocks are used unchanged (no fork). ``W_θ`` starts at zero and ``b`` at ``init_bias``: the
paper's plain init is ``b = 0`` (every gate 0.5); a large ``b`` saturates the gates open and
reproduces ungated attention exactly (useful right after weight transfer, at the price of a
vanishing gate gradient ``σ'(b)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

GATE_MODES = ("elementwise", "headwise")


class GatedAttnProcessor(nn.Module):
    """SDPA attention with a sigmoid output gate, for one diffusers ``Attention`` module."""

    def __init__(self, attn: Attention, mode: str = "elementwise", init_bias: float = 0.0):
        super().__init__()
        if mode not in GATE_MODES:
            raise ValueError(f"gate mode must be one of {GATE_MODES}, got {mode!r}")
        self.mode, self.heads = mode, attn.heads
        self.head_dim = attn.inner_dim // attn.heads
        out = attn.heads * self.head_dim if mode == "elementwise" else attn.heads
        self.gate = nn.Linear(attn.query_dim, out)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, init_bias)

    def gate_values(self, x: torch.Tensor) -> torch.Tensor:
        """``σ(X W_θ + b)`` as ``(B, L, H, d_head)`` or ``(B, L, H, 1)``."""
        g = torch.sigmoid(self.gate(x))
        return g.view(*x.shape[:2], self.heads, -1)

    def attend(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(softmax(QKᵀ/√d)V as (B, L, H, d), query-side X (B, L, d_model))``."""
        x = hidden_states
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        batch = x.shape[0]
        context = x if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, attn.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(attn.to_q(x)), heads(attn.to_k(context)), heads(attn.to_v(context))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return y.transpose(1, 2), x

    def __call__(  # diffusers calls processors with this signature
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        y, x = self.attend(attn, hidden_states, encoder_hidden_states, attention_mask)
        y = (y * self.gate_values(x)).flatten(2)
        out = attn.to_out[1](attn.to_out[0](y))
        if spatial:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_gated_attention(model: nn.Module, mode: str, init_bias: float) -> int:
    """Give every diffusers ``Attention`` under ``model`` its own gated processor; returns
    how many were installed."""
    count = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.set_processor(GatedAttnProcessor(module, mode, init_bias))
            count += 1
    return count
