"""DeepSeek Sparse Attention (DSA, V3.2): lightning indexer, top-k selection, sparse attention.

- Index score, Eq. (1): ``I[t, s] = Σ_j w[t, j]·ReLU(q[t, j]·k[s])`` — ``H_I`` indexer query
  heads per token, **one** indexer key per token shared by the heads (LayerNorm'd), per-head
  weights ``w`` scaled by ``H_I^-½·d_I^-½`` (reference ``Indexer``).
- Selection, Eq. (2): mask first (disallowed keys ``-inf``), then top-``k`` per query;
  ``|S_t| = min(k, #allowed)``. Selected indices are returned in ascending order so every
  rank builds the same layout from the same scores.
- Attention over the selected keys only; heads share the selection (as in V3.2's MQA mode).
- Training, two phases (:class:`DSAConfig.phase`): ``dense`` warm-up — dense attention, the
  indexer learns ``KL(p_t ‖ softmax(I_t))`` where ``p`` is the main attention summed over
  heads and L1-normalised; ``sparse`` — attention over ``S_t`` and the KL over ``S_t`` only.
  In both the indexer reads a *detached* input and the target ``p`` is detached, so the
  indexer learns only from ``L^I`` and the main model only from the task loss (selection
  is not differentiable). Freezing the main model during warm-up is the trainer's job.

Two exact implementations of the sparse core (``impl``): ``csr`` (default) computes the
``L·k`` scores with ``torch.sparse.sampled_addmm`` and the weighted value sum with
``embedding_bag``, head by head (one head's keys stay in cache) — no ``[L, k, d]`` gather is
materialised; ``gather`` indexes keys and values per query chunk (an order of magnitude
slower on a CPU). Sparse CSR tensors have no forward-mode AD, so under ``torch.func``
transforms (the pMF JVP) the ``gather`` path is used automatically.

Without gradients (sampling, the pMF difference quotients) the indexer scores and selects
chunk by chunk (:func:`indexer_topk`), never holding the ``(L, L)`` scores; with gradients
the KL needs them. Costs on a CPU (``benchmarks/bench_musetalk2.py``): selection is a
``torch.topk`` over every (query, key) pair, ≈8 ns per pair, and the sparse core's gathers
run far below GEMM speed, so on a CPU DSA undercuts the math-backend dense attention (from
``L ≈ 2048`` at ``k = 512``) but not the fused flash kernel, at any ``L`` measured.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

NEG_INF = float("-inf")
GATHER_BUDGET = 1 << 22  # gathered key elements per chunk of the gather path (16 MB fp32)
SCORE_BUDGET = 1 << 20  # index-score block elements per chunk (4 MB fp32)


class DSAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    heads: int = Field(8, ge=1)
    indexer_heads: int = Field(4, ge=1)
    indexer_dim: int = Field(32, ge=1)
    top_k: int = Field(512, ge=1)
    phase: Literal["dense", "sparse"] = "sparse"
    causal: bool = False  # frame-causal: a token sees tokens of its own and earlier frames
    query_chunk: int = Field(256, ge=1)  # indexer / gather rows at once (cache-sized block)


def _score_rows(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Eq. (1) for one chunk: ``q (c, H_I, d_I)``, ``k (S, d_I)``, ``w (c, H_I)`` → ``(c, S)``.

    One ``(c·H_I, d_I) @ (d_I, S)`` product, ReLU in place, then the weighted sum over heads
    as a batched ``(1, H_I) @ (H_I, S)`` product per query: two passes over the block
    instead of one per head and operation."""
    n, heads, dim = q.shape
    rel = torch.relu_(q.reshape(n * heads, dim) @ k.T).view(n, heads, -1)
    return torch.bmm(w[:, None, :], rel)[:, 0]


def score_chunk(chunk: int, heads: int, keys: int) -> int:
    """Queries scored at once: at most ``chunk``, and few enough that the ``(c·H_I, S)``
    block stays within :data:`SCORE_BUDGET` (cache-sized; measured 1.5× faster at 16k keys)."""
    return max(1, min(chunk, SCORE_BUDGET // (heads * keys)))


def index_scores(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """Eq. (1): ``q (B, L, H_I, d_I)``, ``k (B, S, d_I)``, ``w (B, L, H_I)`` → ``(B, L, S)``,
    :func:`score_chunk` queries at a time."""
    c = score_chunk(chunk, q.shape[2], k.shape[1])
    return torch.stack(
        [
            torch.cat(
                [
                    _score_rows(q[bi, i : i + c], k[bi], w[bi, i : i + c])
                    for i in range(0, q.shape[1], c)
                ]
            )
            for bi in range(q.shape[0])
        ]
    )


def allowed_mask(frame_ids: torch.Tensor, causal: bool) -> torch.Tensor | None:
    """``(L, S)`` bool: key ``s`` visible from query ``t`` (``None``: everything visible)."""
    if not causal:
        return None
    return frame_ids[None, :] <= frame_ids[:, None]


def select_topk(
    scores: torch.Tensor, k: int, allowed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` keys per query under the mask: ``(indices, valid)``, both ``(B, L, min(k, S))``,
    indices ascending; ``valid`` is False where fewer than ``k`` keys were allowed."""
    if allowed is not None:
        scores = scores.masked_fill(~allowed, NEG_INF)
    kk = min(k, scores.shape[-1])
    top = scores.topk(kk, dim=-1, sorted=False).indices
    idx = top.sort(dim=-1).values
    valid = (
        torch.ones_like(idx, dtype=torch.bool)
        if allowed is None
        else allowed.expand(scores.shape).gather(-1, idx)
    )
    return idx, valid


def indexer_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    top_k: int,
    allowed: torch.Tensor | None,
    chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_topk(index_scores(q, k, w, chunk), top_k, allowed)`` without the ``(B, L, S)``
    score matrix: each chunk of queries is scored and selected while it is in cache (the
    same per-chunk arithmetic, so the same selection). No gradient: the
    selection is not differentiable, and the indexer's KL needs the full scores anyway."""
    idx, valid = [], []
    c = score_chunk(chunk, q.shape[2], k.shape[1])
    for bi in range(q.shape[0]):
        for i in range(0, q.shape[1], c):
            scores = _score_rows(q[bi, i : i + c], k[bi], w[bi, i : i + c])
            sel = select_topk(scores, top_k, None if allowed is None else allowed[i : i + c])
            idx.append(sel[0])
            valid.append(sel[1])
    rows = q.shape[1]
    return torch.cat(idx).view(q.shape[0], rows, -1), torch.cat(valid).view(q.shape[0], rows, -1)


def _sparse_gather(q, k, v, idx, valid, chunk):
    """``q, k, v (B, H, L, d)``, ``idx/valid (B, L, k)`` → ``(out (B,H,L,d), probs (B,H,L,k))``."""
    b, heads, length, d = q.shape
    chunk = min(chunk, max(1, GATHER_BUDGET // max(1, idx.shape[-1] * heads * d)))
    outs, probs = [], []
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, L, H, d)
    batch = torch.arange(b)[:, None, None]
    for start in range(0, length, chunk):
        ic, vc = idx[:, start : start + chunk], valid[:, start : start + chunk]
        ks, vs = kt[batch, ic], vt[batch, ic]  # (B, c, k, H, d)
        sc = torch.einsum("bhcd,bckhd->bhck", q[:, :, start : start + chunk], ks) * d**-0.5
        p = torch.softmax(sc.masked_fill(~vc[:, None], NEG_INF), dim=-1)
        outs.append(torch.einsum("bhck,bckhd->bhcd", p, vs))
        probs.append(p)
    return torch.cat(outs, dim=2), torch.cat(probs, dim=2)


def _sparse_csr(q, k, v, idx, valid, need_probs):
    b, h, length, d = q.shape
    kk = idx.shape[-1]
    crow = torch.arange(0, length * kk + 1, kk, device=q.device)
    masked = not bool(valid.all())
    out = q.new_empty(b, length, h, d)  # heads last: the caller's (B, L, H·d) is a view
    probs = q.new_empty(b, h, length, kk) if need_probs else None
    for bi in range(b):
        col = idx[bi].reshape(-1)
        pattern = torch.sparse_csr_tensor(
            crow, col, torch.zeros(length * kk, dtype=q.dtype, device=q.device), (length, length)
        )
        for hi in range(h):
            s = torch.sparse.sampled_addmm(pattern, q[bi, hi], k[bi, hi].T, beta=0.0, alpha=d**-0.5)
            sc = s.values().view(length, kk)
            p = torch.softmax(sc.masked_fill(~valid[bi], NEG_INF) if masked else sc, dim=-1)
            out[bi, :, hi] = F.embedding_bag(idx[bi], v[bi, hi], per_sample_weights=p, mode="sum")
            if probs is not None:
                probs[bi, hi] = p
    return out.transpose(1, 2), probs


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    valid: torch.Tensor,
    impl: Literal["auto", "csr", "gather"] = "auto",
    chunk: int = 256,
    need_probs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of each query over its selected keys: ``(out (B,H,L,d), probs (B,H,L,k))``;
    ``probs`` (the indexer's KL target) is None from ``csr`` unless ``need_probs``."""
    if impl == "auto":
        impl = "gather" if torch._C._are_functorch_transforms_active() else "csr"
    if impl == "csr":
        return _sparse_csr(q, k, v, idx, valid, need_probs)
    return _sparse_gather(q, k, v, idx, valid, chunk)


def dense_attention(q, k, v, allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention (the warm-up needs the probabilities): ``(out, probs)``."""
    sc = torch.einsum("bhld,bhsd->bhls", q, k) * q.shape[-1] ** -0.5
    if allowed is not None:
        sc = sc.masked_fill(~allowed, NEG_INF)
    p = torch.softmax(sc, dim=-1)
    return p @ v, p


def indexer_kl(
    target: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """``mean_t KL(p_t ‖ softmax(I_t))`` over the keys in ``valid`` (``None``: all keys).

    ``target`` must be non-negative and sum to 1 over the valid keys of each query.
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, NEG_INF)
    log_q = torch.log_softmax(scores, dim=-1)
    terms = torch.xlogy(target, target) - torch.where(target > 0, target * log_q, 0.0)
    return terms.sum(-1).mean()


def attention_target(probs: torch.Tensor) -> torch.Tensor:
    """``p``: the main attention summed over heads and L1-normalised over keys (detached)."""
    p = probs.detach().sum(dim=1)
    return p / p.sum(dim=-1, keepdim=True).clamp_min(1e-12)


class LightningIndexer(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.wq = nn.Linear(dim, heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim)
        self.weights = nn.Linear(dim, heads, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q (B, L, H_I, d_I), k (B, L, d_I), w (B, L, H_I))`` of Eq. (1)."""
        b, length, _ = x.shape
        q = self.wq(x).view(b, length, self.heads, self.head_dim)
        k = self.k_norm(self.wk(x))
        w = self.weights(x) * (self.heads**-0.5 * self.head_dim**-0.5)
        return q, k, w

    def forward(self, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Index scores ``(B, L, L)``."""
        return index_scores(*self.project(x), chunk)

    @torch.no_grad()
    def select(
        self, x: torch.Tensor, top_k: int, allowed: torch.Tensor | None, chunk: int = 256
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``select_topk(self(x), top_k, allowed)`` without the ``(B, L, L)`` scores."""
        return indexer_topk(*self.project(x), top_k, allowed, chunk)


class SparseSelfAttention(nn.Module):
    """Pre-norm self-attention over ``L`` tokens with DSA selection; residual output.

    ``forward(x (B, L, C), frame_ids (L,)) -> (x + attn, L^I)``. The output projection starts
    at zero, so inserting the block into a trained network changes nothing at first. ``L^I``
    is a training signal: with gradients disabled it is not computed (returned as 0), and
    the dense phase then skips the indexer altogether.
    """

    def __init__(self, channels: int, cfg: DSAConfig):
        super().__init__()
        if channels % cfg.heads:
            raise ValueError(f"{channels} channels do not split into {cfg.heads} heads")
        self.cfg = cfg
        self.norm = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.indexer = LightningIndexer(channels, cfg.indexer_heads, cfg.indexer_dim)

    def forward(
        self,
        x: torch.Tensor,
        frame_ids: torch.Tensor,
        impl: Literal["auto", "csr", "gather"] = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, length, c = x.shape
        h = self.norm(x)
        q, k, v = (
            t.view(b, length, self.cfg.heads, -1).transpose(1, 2) for t in self.qkv(h).chunk(3, -1)
        )
        allowed = allowed_mask(frame_ids, self.cfg.causal)
        learn = torch.is_grad_enabled()  # the KL only trains the indexer
        kl = x.new_zeros(())
        chunk = self.cfg.query_chunk
        if self.cfg.phase == "dense":
            y, probs = dense_attention(q, k, v, allowed)
            if learn:
                scores = self.indexer(h.detach(), chunk)
                kl = indexer_kl(attention_target(probs), scores, allowed)
        elif learn:  # the KL needs the scores (with gradient) at the selected keys
            scores = self.indexer(h.detach(), chunk)
            idx, valid = select_topk(scores.detach(), self.cfg.top_k, allowed)
            y, probs = sparse_attention(q, k, v, idx, valid, impl, chunk)
            kl = indexer_kl(attention_target(probs), scores.gather(-1, idx), valid)
        else:
            idx, valid = self.indexer.select(h, self.cfg.top_k, allowed, chunk)
            y, _ = sparse_attention(q, k, v, idx, valid, impl, chunk, need_probs=False)
        return x + self.out(y.transpose(1, 2).reshape(b, length, c)), kl
