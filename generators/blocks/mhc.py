"""mHC: manifold-constrained hyper-connections for a conv UNet (DeepSeek 2512.24880).

Follows the official PyTorch reference (``deepseek-ai/TileKernels``, ``torch/mhc.py``) with
each spatial position as a token and channels as ``C``. The residual is ``n`` streams
``s ∈ [B, n, C, H, W]``; around a block ``F``:

- ``mixes = RMSNorm(vec(s)) @ fnᵀ · [α_pre]*n ++ [α_post]*n ++ [α_res]*n² + base`` per position
  (``fn: [n(n+2), n·C]``, split in the order ``[pre | post | res]``);
- ``H_pre = σ(mixes_pre)``, ``H_post = 2σ(mixes_post)``, ``H_res = SinkhornKnopp(mixes_res)``
  (softmax start + ``eps``, then alternating column / row normalisation: doubly stochastic);
- ``layer_input = Σ_m H_pre[m]·s_m``; ``new_s_j = Σ_m H_res[m, j]·s_m + H_post[j]·F(layer_input)``
  (``H_resᵀ`` applied to the streams, as in the reference).

A diffusers block ``blk`` computes ``x + f(x)`` itself (resnets, transformers); the branch
is recovered as ``F(x) = blk(x) - x``, so blocks whose input carries extra tensors (an up
block's skip) still fit as long as their output has the stream width.

**Initialisation** (a choice, stated because weight transfer relies on it): ``fn = 0`` and
``α = 1``; ``base_pre`` so that ``H_pre = 1/n`` (``σ = 1`` for ``n = 1``, saturated), ``base_post
= 0`` (``H_post = 1``), ``base_res = 0`` (``H_res = 1/n`` everywhere). With identical streams
(after :func:`expand`) the block then computes exactly ``x + F(x)``: a transferred MuseTalk 1.5
network starts out computing its old function for any ``n``, and ``fn`` (whose gradient is
not zero at ``fn = 0``) learns the routing. :class:`StreamCollapse` reads the streams back to
one tensor (before down/up-sampling and skip connections) with ``σ`` weights, ``1/n`` at init.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

SATURATED_LOGIT = 20.0  # σ(20) == 1.0 in float32


def sinkhorn_knopp(logits: torch.Tensor, iters: int = 20, eps: float = 1e-6) -> torch.Tensor:
    """Project ``[..., n, n]`` logits towards the Birkhoff polytope (doubly stochastic).

    Starts from ``softmax(logits, -1) + eps`` (the reference kernels; the paper's ``exp`` start
    gives the same fixed point up to scale), then ``iters`` rounds of column then row
    normalisation, so rows sum to 1 exactly and columns to within the residual of the
    iteration (< 1e-3 after 20 rounds for standard-normal logits).
    """
    m = torch.softmax(logits, dim=-1) + eps
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


def expand(h: torch.Tensor, n: int) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, n, C, H, W]``: the streams all start as the same tensor."""
    return h.unsqueeze(1).expand(-1, n, *h.shape[1:]).contiguous()


def _init_logit(n: int) -> float:
    return SATURATED_LOGIT if n == 1 else math.log(1.0 / (n - 1))  # σ(·) = 1/n


def _rms(s: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS over the stream and channel axes of ``[B, n, C, H, W]`` → ``[B, 1, 1, H, W]``."""
    return torch.sqrt(s.pow(2).mean(dim=(1, 2), keepdim=True) + eps)


class HyperConnection(nn.Module):
    """One mHC around a block (see the module docstring). ``n`` streams of width ``channels``."""

    def __init__(self, n: int, channels: int, sinkhorn_iters: int = 20, norm_eps: float = 1e-6):
        super().__init__()
        self.n, self.channels, self.sinkhorn_iters, self.norm_eps = (
            n,
            channels,
            sinkhorn_iters,
            norm_eps,
        )
        k = n * (n + 2)
        self.fn = nn.Parameter(torch.zeros(k, n * channels))
        self.norm_weight = nn.Parameter(torch.ones(n * channels))
        self.scale = nn.Parameter(torch.ones(3))
        base = torch.zeros(k)
        base[:n] = _init_logit(n)
        self.base = nn.Parameter(base)

    def coefficients(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(H_pre [B,n,H,W], H_post [B,n,H,W], H_res [B,H,W,n,n])`` per position."""
        n = self.n
        b, _, c, hh, ww = s.shape
        w = (self.fn * self.norm_weight[None]).view(-1, n, c)
        mixes = torch.einsum("bnchw,knc->bkhw", s / _rms(s, self.norm_eps), w)
        scale = torch.cat(
            [self.scale[0].expand(n), self.scale[1].expand(n), self.scale[2].expand(n * n)]
        )
        mixes = mixes * scale[None, :, None, None] + self.base[None, :, None, None]
        pre = torch.sigmoid(mixes[:, :n])
        post = 2.0 * torch.sigmoid(mixes[:, n : 2 * n])
        res_logits = mixes[:, 2 * n :].permute(0, 2, 3, 1).reshape(b, hh, ww, n, n)
        return pre, post, sinkhorn_knopp(res_logits, self.sinkhorn_iters)

    def forward(
        self, s: torch.Tensor, block: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        pre, post, res = self.coefficients(s)
        layer_input = (pre.unsqueeze(2) * s).sum(dim=1)
        branch = block(layer_input) - layer_input
        mixed = torch.einsum("bhwmj,bmchw->bjchw", res, s)
        return mixed + post.unsqueeze(2) * branch.unsqueeze(1)


class StreamCollapse(nn.Module):
    """Read ``n`` streams back to one tensor: ``Σ_m σ(dyn_m + base_m)·s_m`` (``1/n`` at init)."""

    def __init__(self, n: int, channels: int, norm_eps: float = 1e-6):
        super().__init__()
        self.n, self.norm_eps = n, norm_eps
        self.fn = nn.Parameter(torch.zeros(n, n * channels))
        self.base = nn.Parameter(torch.full((n,), _init_logit(n)))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        w = self.fn.view(self.n, self.n, -1)
        mix = torch.einsum("bnchw,knc->bkhw", s / _rms(s, self.norm_eps), w)
        weights = torch.sigmoid(mix + self.base[None, :, None, None])
        return (weights.unsqueeze(2) * s).sum(dim=1)
