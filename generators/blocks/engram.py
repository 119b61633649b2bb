"""Engram conditional memory for a conv UNet: hashed n-grams of audio codes → gated residual.

Per frame (following the Engram demo and TileKernels' ``engram_gate_ref``):

1. keys: one discrete audio code per video frame (k-means codes of the engram stage, or
   SenseVoice CTC argmax tokens: ``vocab_size`` = the CTC vocabulary); n-grams of orders
   ``orders`` are hashed by :mod:`generators.blocks.engram_hash` (odd multipliers, XOR
   mix, one distinct prime-sized table per head) into rows of one flat embedding table.
   :meth:`Engram.rows` does this on a whole clip's codes (the data path calls it; the
   network takes the rows). ``causal``
   n-grams read ``x_t, x_{t-1}, …``; ``centred`` ones read ``⌊(n-1)/2⌋`` codes ahead
   (right-padded): an explicit choice, since lip shapes anticipate the next phoneme but a
   centred key is not streamable;
2. ``e_t``: the concatenation of the looked-up rows (``d_head`` each);
3. per mHC stream ``m`` and spatial position:
   ``α = σ(signed_sqrt(RMSNorm(h^(m))·RMSNorm(W_k^(m) e_t)
   / √C))``, ``signed_sqrt(z) = sign(z)·sqrt(max(|z|, 1e-6))`` (finite gradient at 0);
4. value ``v = W_v e_t`` (shared across streams, **zero-initialised**: the module is an exact
   no-op at init), ``o = α·v``, then ``o + SiLU(ShortConv(RMSNorm(o)))`` with a depthwise
   causal conv over the sample's frames (kernel 4, dilation ``max(orders)``, no bias);
5. residual: ``s ← s + o`` on every stream, before the level's attention.

**Memory bank** (engram stage): :meth:`Engram.init_from_bank` *initialises* the table from
the bank (the bank's orders, heads and prime table sizes must be this module's; its hash
multipliers are adopted, and each slot a training frame reached starts at a fixed random
projection of that slot's mean mouth latent, scaled to the init std): the table is then
trained. Initialising rather than complementing (adding the bank's retrieved latents as an
extra input, as the musetalk15 baseline's prior channels do) keeps one representation (the
lookup), adds no input channels the 1.5 weights do not have, and lets n-grams with similar
mouths start near each other; the price is that the bank's values are only a starting point.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from generators.blocks.config import EngramConfig
from generators.blocks.engram_hash import hash_ngrams, make_multipliers, make_primes

EMBED_INIT_STD = 0.02


def signed_sqrt(z: torch.Tensor) -> torch.Tensor:
    return torch.sign(z) * torch.sqrt(z.abs().clamp_min(1e-6))


def _rms_norm(x: torch.Tensor, dim: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    out = x * torch.rsqrt(x.pow(2).mean(dim=dim, keepdim=True) + 1e-6)
    return out if weight is None else out * weight


def engram_rows(
    codes: np.ndarray,
    multipliers: np.ndarray,
    primes: np.ndarray,
    offsets: np.ndarray,
    cfg: EngramConfig,
) -> np.ndarray:
    """Flat table rows ``(T, orders·heads)`` of a code sequence ``(T,)`` under the given
    hashing (a module's buffers, or a memory bank's, which a module adopts on
    :meth:`Engram.init_from_bank`), with ``cfg``'s orders and window."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size and (codes.min() < 0 or codes.max() >= cfg.vocab_size):
        raise ValueError(f"codes must lie in [0, {cfg.vocab_size})")
    pad_id = cfg.vocab_size
    out = []
    for o, n in enumerate(cfg.orders):
        ahead = (n - 1) // 2 if cfg.window == "centred" else 0
        padded = np.concatenate([codes, np.full(ahead, pad_id, np.int64)])
        idx = hash_ngrams(padded, multipliers, primes[o : o + 1], [n], pad_id)[ahead:, 0]
        out.append(idx + offsets[o][None])
    return np.concatenate(out, axis=1)


def own_hashing(cfg: EngramConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(multipliers, primes, offsets)`` a module of this config hashes with until it adopts
    a memory bank's (:meth:`Engram.init_from_bank`): a function of the config alone."""
    primes = make_primes(cfg.table_size, len(cfg.orders), cfg.heads_per_order)
    offsets = np.concatenate([[0], np.cumsum(primes.reshape(-1))[:-1]]).reshape(primes.shape)
    mult = make_multipliers(cfg.seed, max(cfg.orders), cfg.vocab_size + 1)
    return mult, primes, offsets.astype(np.int64)


class Engram(nn.Module):
    """Engram over ``n`` streams of width ``channels`` (``n = 1`` without mHC)."""

    def __init__(self, cfg: EngramConfig, channels: int, streams: int = 1):
        super().__init__()
        self.cfg, self.channels, self.streams = cfg, channels, streams
        mult, primes, offsets = own_hashing(cfg)
        self.register_buffer("multipliers", torch.from_numpy(mult))
        self.register_buffer("primes", torch.from_numpy(primes))
        self.register_buffer("offsets", torch.from_numpy(offsets))
        self.pad_id = cfg.vocab_size  # one past the last code
        self.table = nn.Embedding(int(primes.sum()), cfg.head_dim)
        nn.init.normal_(self.table.weight, std=EMBED_INIT_STD)
        mem = len(cfg.orders) * cfg.heads_per_order * cfg.head_dim
        self.key = nn.Parameter(torch.randn(streams, channels, mem) / mem**0.5)
        self.h_norm = nn.Parameter(torch.ones(streams, channels))
        self.k_norm = nn.Parameter(torch.ones(streams, channels))
        self.value = nn.Linear(mem, channels, bias=False)
        nn.init.zeros_(self.value.weight)
        self.conv_norm = nn.Parameter(torch.ones(streams, channels))
        self.conv = nn.Conv1d(
            streams * channels,
            streams * channels,
            cfg.conv_kernel,
            groups=streams * channels,
            dilation=max(cfg.orders),
            bias=False,
        )

    @property
    def num_rows(self) -> int:
        """Looked-up rows per frame (orders × heads)."""
        return self.primes.numel()

    def rows(self, codes: np.ndarray) -> np.ndarray:
        """Flat table rows ``(T, orders·heads)`` for a clip's code sequence ``(T,)``."""
        return engram_rows(
            codes,
            self.multipliers.cpu().numpy(),
            self.primes.cpu().numpy(),
            self.offsets.cpu().numpy(),
            self.cfg,
        )

    def memory(self, rows: torch.Tensor) -> torch.Tensor:
        """``e_t``: ``(N, orders·heads)`` rows → ``(N, orders·heads·head_dim)``."""
        return self.table(rows).flatten(1)

    def gate(self, s: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``α`` of shape ``(N, n, H, W)`` for streams ``s (N, n, C, H, W)`` and memory ``e``."""
        k = torch.einsum("ncm,bm->bnc", self.key, e)
        h = _rms_norm(s, 2, self.h_norm[None, :, :, None, None])
        k = _rms_norm(k, 2, self.k_norm[None])
        dot = torch.einsum("bnchw,bnc->bnhw", h, k) / self.channels**0.5
        return torch.sigmoid(signed_sqrt(dot))

    def forward(self, s: torch.Tensor, rows: torch.Tensor, frames: int) -> torch.Tensor:
        """``s + Engram(s)`` for streams ``(B·frames, n, C, H, W)`` and rows ``(B·frames, R)``."""
        e = self.memory(rows)
        o = self.gate(s, e).unsqueeze(2) * self.value(e)[:, None, :, None, None]
        bf, n, c, hh, ww = o.shape
        seq = _rms_norm(o, 2, self.conv_norm[None, :, :, None, None])
        seq = seq.view(bf // frames, frames, n * c, hh * ww).permute(0, 3, 2, 1)
        seq = seq.reshape(-1, n * c, frames)
        pad = (self.conv.kernel_size[0] - 1) * self.conv.dilation[0]
        conv = F.silu(self.conv(F.pad(seq, (pad, 0))))
        conv = conv.view(bf // frames, hh * ww, n * c, frames).permute(0, 3, 2, 1)
        return s + o + conv.reshape(bf, n, c, hh, ww)

    @torch.no_grad()
    def init_from_bank(self, bank: dict[str, torch.Tensor]) -> int:
        """Adopt the bank's hashing and start reached slots from its mouth latents.

        Returns the number of table rows initialised. ``ValueError`` when the bank's table
        layout (orders × heads, vocabulary) does not match this module's config.
        """
        if list(bank["orders"].tolist()) != list(self.cfg.orders) or not torch.equal(
            bank["primes"].cpu(), self.primes.cpu()
        ):
            raise ValueError(
                "memory bank orders/heads/table sizes do not match the Engram config "
                f"(bank orders {bank['orders'].tolist()}, primes {bank['primes'].tolist()}; "
                f"module orders {self.cfg.orders}, primes {self.primes.tolist()})"
            )
        if (
            bank["unigram_counts"].shape[0] != self.cfg.vocab_size
            or int(bank["pad_id"][0]) != self.pad_id
        ):
            raise ValueError("memory bank vocabulary does not match the Engram config")
        self.multipliers.copy_(bank["multipliers"])
        self.offsets.copy_(bank["offsets"])
        values = bank["table_values"].float().flatten(1)
        reached = bank["table_counts"] > 0
        gen = torch.Generator().manual_seed(self.cfg.seed)
        proj = torch.randn(values.shape[1], self.cfg.head_dim, generator=gen)
        emb = values[reached] @ proj
        emb = emb / (emb.std() + 1e-8) * EMBED_INIT_STD
        self.table.weight[reached.to(self.table.weight.device)] = emb.to(self.table.weight)
        return int(reached.sum())
