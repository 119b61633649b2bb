"""Audio cross-attention tokens of the ``musetalk2`` family: a window per frame, one encoding.

SenseVoice (default): the features file keeps native rows at ≈16.67 Hz, ``(T_s, 512)``, and
``frame_index (T,)`` — the row nearest each video frame. Frame ``t`` is conditioned on rows
``frame_index[t] - w .. frame_index[t] + w`` (``2w + 1`` tokens; ``w = 2`` spans ≈0.3 s).
HuBERT (selectable): ``(T, 2, D)``, two 50 Hz steps per frame; frame ``t`` gets frames
``t - w .. t + w`` × 2 steps. Positions past either end of the clip are zeros.

:func:`audio_tokens` is the **one** function that builds tokens, for training batches and
for sampling alike, and it adds the sinusoidal position encoding (MuseTalk's
``PositionalEncoding``: ``sin`` on even, ``cos`` on odd channels). MuseTalk 1.5 adds it at
inference only (issue #136), a train/test mismatch this avoids by construction.
"""

from __future__ import annotations

import math

import torch


def positional_encoding(num_tokens: int, dim: int) -> torch.Tensor:
    """``(num_tokens, dim)``: ``pe[p, 2i] = sin(p·ω_i)``, ``pe[p, 2i+1] = cos(p·ω_i)``,
    ``ω_i = 10000^(-2i/dim)`` (odd ``dim`` supported)."""
    pos = torch.arange(num_tokens, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(num_tokens, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return pe


def window_positions(frames: torch.Tensor, frame_index: torch.Tensor | None, window: int):
    """Row index per (frame, offset) ``(N, 2w+1)`` into the audio's own time axis."""
    offsets = torch.arange(-window, window + 1)
    centre = frames.long() if frame_index is None else frame_index.long()[frames.long()]
    return centre[:, None] + offsets[None, :]


def audio_tokens(
    features: torch.Tensor,
    frames: torch.Tensor,
    window: int,
    frame_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens ``(len(frames), (2w+1)·S, D)`` float32 for ``frames`` of one clip.

    ``features`` is ``(rows, D)`` with ``frame_index`` (SenseVoice, ``S = 1``) or
    ``(T, S, D)`` per video frame (HuBERT, ``S = 2``); the position encoding is added here.
    """
    if frame_index is None and features.ndim != 3:
        raise ValueError(f"per-frame audio must be (T, S, D), got {tuple(features.shape)}")
    if frame_index is not None and features.ndim != 2:
        raise ValueError(f"row audio must be (rows, D), got {tuple(features.shape)}")
    rows = features if features.ndim == 3 else features[:, None, :]
    idx = window_positions(frames, frame_index, window)
    valid = (idx >= 0) & (idx < rows.shape[0])
    gathered = rows[idx.clamp(0, max(0, rows.shape[0] - 1))].float()  # (N, 2w+1, S, D)
    gathered = torch.where(valid[:, :, None, None], gathered, torch.zeros(()))
    tokens = gathered.reshape(len(frames), -1, rows.shape[-1])
    return tokens + positional_encoding(tokens.shape[1], tokens.shape[2])[None]
