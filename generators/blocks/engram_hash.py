"""Engram hashing, lookup and bank I/O: pure functions shared by the engram stage and families.

Follows the official Engram demo (``deepseek-ai/Engram``, ``engram_demo_v1.py``) with
discrete audio codes in place of compressed token ids:

- one **odd** multiplier ``m_k`` per n-gram position ``k`` (``k = 0`` is the current frame),
  drawn from a seeded generator and bounded so ``code * m_k`` never overflows int64;
- for order ``n``: ``mix_t = XOR_{k<n} (x_{t-k} · m_k)``, where positions before the clip
  start read ``pad_id`` (left padding, **causal**: frame ``t`` only sees codes ``≤ t``);
- hash head ``j`` of order ``n`` takes ``mix_t mod p_{n,j}``; every ``p_{n,j}`` is a distinct
  prime ``≥ table_size`` (searched upwards as in the demo), so heads disagree about which
  n-grams collide and two n-grams share a slot in *every* head only when their mixes agree
  modulo the product of the primes;
- one flat table holds all heads of all orders; head ``(n, j)`` owns rows
  ``[offset_{n,j}, offset_{n,j} + p_{n,j})``.

The value of a slot is the mean mouth-region VAE latent of the training frames that hashed
there; :func:`lookup` averages a frame's slots over orders and heads (an empty slot counts
as the frame's unigram mean) to give the generator a retrieved mouth prior.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

BANK_KEYS = (
    "codebook",
    "multipliers",
    "orders",
    "primes",
    "offsets",
    "pad_id",
    "table_values",
    "table_counts",
    "unigram_values",
    "unigram_counts",
    "global_mean",
)


def read_bank(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``memory_bank.safetensors`` into the tensor dict :func:`lookup` takes."""
    with safe_open(str(path), framework="pt") as f:
        bank = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    missing = [k for k in BANK_KEYS if k not in bank]
    if missing:
        raise ValueError(f"{path}: not a memory bank, missing {missing}")
    return bank


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def make_primes(table_size: int, num_orders: int, num_heads: int) -> np.ndarray:
    """``(num_orders, num_heads)`` distinct primes, each ``≥ table_size``, increasing.

    As in the demo each order restarts its search at ``table_size`` and skips primes
    already taken, so all heads of all orders get different moduli.
    """
    seen: set[int] = set()
    out = np.zeros((num_orders, num_heads), dtype=np.int64)
    for o in range(num_orders):
        candidate = table_size
        for h in range(num_heads):
            while not _is_prime(candidate) or candidate in seen:
                candidate += 1
            seen.add(candidate)
            out[o, h] = candidate
    return out


def make_multipliers(seed: int, max_order: int, vocab_size: int) -> np.ndarray:
    """``max_order`` odd int64 multipliers from ``seed`` with ``vocab_size · m < 2**63``."""
    half_bound = max(1, (np.iinfo(np.int64).max // max(1, vocab_size)) // 2)
    rng = np.random.default_rng(seed)
    r = rng.integers(low=0, high=half_bound, size=(max_order,), dtype=np.int64)
    return r * 2 + 1


def ngram_context(codes: np.ndarray, order: int, pad_id: int) -> np.ndarray:
    """``(T, order)`` array whose row ``t`` is ``(x_t, x_{t-1}, …, x_{t-order+1})``, left-padded."""
    codes = np.asarray(codes, dtype=np.int64)
    t = codes.shape[0]
    padded = np.concatenate([np.full(order - 1, pad_id, dtype=np.int64), codes])
    return np.stack([padded[order - 1 - k : order - 1 - k + t] for k in range(order)], axis=1)


def hash_ngrams(
    codes: np.ndarray,
    multipliers: np.ndarray,
    primes: np.ndarray,
    orders: np.ndarray | list[int],
    pad_id: int,
) -> np.ndarray:
    """Per-head slot indices ``(T, num_orders, num_heads)``, local to each head (``< p``)."""
    codes = np.asarray(codes, dtype=np.int64)
    multipliers = np.asarray(multipliers, dtype=np.int64)
    primes = np.asarray(primes, dtype=np.int64)
    out = np.zeros((codes.shape[0], len(orders), primes.shape[1]), dtype=np.int64)
    for o, n in enumerate(int(x) for x in orders):
        ctx = ngram_context(codes, n, pad_id)
        mix = ctx[:, 0] * multipliers[0]
        for k in range(1, n):
            mix = np.bitwise_xor(mix, ctx[:, k] * multipliers[k])
        out[:, o, :] = mix[:, None] % primes[o][None, :]
    return out


def assign_codes(codebook: torch.Tensor | np.ndarray, audio_features: np.ndarray) -> np.ndarray:
    """Nearest-centroid code per frame, ``(T,)`` int64.

    ``audio_features`` is ``(T, D)`` per-frame features or ``(T, 2, D)`` as stored by the
    features stage (the two 50 Hz steps are averaged into one vector per video frame).
    """
    cb = torch.as_tensor(np.asarray(codebook), dtype=torch.float32)
    feats = np.asarray(audio_features, dtype=np.float32)
    if feats.ndim == 3:
        feats = feats.mean(axis=1)
    if feats.ndim != 2 or feats.shape[1] != cb.shape[1]:
        raise ValueError(f"features {feats.shape} do not match codebook {tuple(cb.shape)}")
    if feats.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    x = torch.from_numpy(feats)
    d2 = (x * x).sum(1, keepdim=True) - 2.0 * x @ cb.T + (cb * cb).sum(1)[None, :]
    return d2.argmin(dim=1).numpy().astype(np.int64)


def flat_indices(bank: dict[str, torch.Tensor], codes: np.ndarray) -> np.ndarray:
    """Rows of the flat table for each frame: ``(T, num_orders * num_heads)``."""
    idx = hash_ngrams(
        codes,
        bank["multipliers"].numpy(),
        bank["primes"].numpy(),
        bank["orders"].tolist(),
        int(bank["pad_id"][0]),
    )
    idx = idx + bank["offsets"].numpy()[None]
    return idx.reshape(idx.shape[0], -1)


def lookup(bank: dict[str, torch.Tensor], codes: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Retrieved mouth prior ``(T, C, h_mouth, w)`` float32 for a code sequence ``(T,)``.

    Each frame reads one slot per (order, head); a slot no training frame reached is
    replaced by the frame's unigram mean (the global mean when the code itself was never
    seen); the result is the mean over all (order, head) reads.
    """
    codes_np = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes, np.int64)
    k = bank["unigram_counts"].shape[0]
    if codes_np.ndim != 1:
        raise ValueError(f"codes must be 1-D, got shape {codes_np.shape}")
    if codes_np.size and (codes_np.min() < 0 or codes_np.max() >= k):
        raise ValueError(f"codes must lie in [0, {k})")
    flat = torch.from_numpy(flat_indices(bank, codes_np))
    codes_t = torch.from_numpy(codes_np)
    values = bank["table_values"].float()
    counts = bank["table_counts"]
    uni_seen = bank["unigram_counts"][codes_t] > 0
    fallback = torch.where(
        uni_seen[:, None, None, None],
        bank["unigram_values"].float()[codes_t],
        bank["global_mean"].float()[None],
    )
    acc = torch.zeros_like(fallback)
    for j in range(flat.shape[1]):
        rows = flat[:, j]
        hit = (counts[rows] > 0)[:, None, None, None]
        acc += torch.where(hit, values[rows], fallback)
    return acc / max(1, flat.shape[1])


def collision_rates(distinct_idx: np.ndarray) -> tuple[float, float]:
    """Collision rates of the distinct n-grams of one order, from their slots ``(M, heads)``.

    Returns ``(all_heads, per_head)``: the fraction of distinct n-grams that share their
    slot with another n-gram in *every* head (no clean read left; falls quickly with more
    heads), and the mean over heads of the fraction sharing a slot in that head (depends on
    the table size only).
    """
    m, heads = distinct_idx.shape
    if m == 0:
        return 0.0, 0.0
    collided = np.zeros((m, heads), dtype=bool)
    for h in range(heads):
        _, inverse, counts = np.unique(distinct_idx[:, h], return_inverse=True, return_counts=True)
        collided[:, h] = counts[inverse] > 1
    return float(collided.all(axis=1).mean()), float(collided.mean())
