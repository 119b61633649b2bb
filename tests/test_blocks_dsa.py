"""DSA lightning indexer and sparse attention: training.md §3.5 tests (generators.blocks.dsa)."""

from __future__ import annotations

import warnings

import pytest
import torch

from generators.blocks import dsa
from generators.blocks.dsa import (
    DSAConfig,
    SparseSelfAttention,
    allowed_mask,
    attention_target,
    dense_attention,
    index_scores,
    indexer_kl,
    indexer_topk,
    select_topk,
    sparse_attention,
)

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")


def test_vectorised_index_scores_match_a_naive_triple_loop():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 3, 5, generator=gen)
    k = torch.randn(2, 9, 5, generator=gen)
    w = torch.randn(2, 7, 3, generator=gen)
    got = index_scores(q, k, w, chunk=3)
    ref = torch.zeros(2, 7, 9)
    for b in range(2):
        for t in range(7):
            for s in range(9):
                ref[b, t, s] = sum(w[b, t, j] * torch.relu(q[b, t, j] @ k[b, s]) for j in range(3))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["csr", "gather"])
def test_selecting_every_key_equals_dense_attention(impl):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 12, 4, generator=gen) for _ in range(3))
    scores = torch.randn(2, 12, 12, generator=gen)
    for causal in (False, True):
        allowed = allowed_mask(torch.arange(12), causal)
        idx, valid = select_topk(scores, 20, allowed)  # k ≥ L
        out, _ = sparse_attention(q, k, v, idx, valid, impl=impl, chunk=5)
        dense, _ = dense_attention(q, k, v, allowed)
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_mask_is_applied_before_topk():
    scores = torch.randn(1, 10, 10, generator=torch.Generator().manual_seed(2))
    scores[..., -1] = 100.0  # the best key is in the future of every query but the last
    idx, valid = select_topk(scores, 4, allowed_mask(torch.arange(10), causal=True))
    for t in range(10):
        chosen = idx[0, t][valid[0, t]]
        assert len(chosen) == min(4, t + 1)
        assert torch.all(chosen <= t)
    assert torch.all(idx[0].diff(dim=-1) > 0)  # ascending layout


def test_kl_target_is_a_distribution_and_kl_vanishes_at_log_p():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 8, 6, generator=gen) for _ in range(3))
    allowed = allowed_mask(torch.arange(8), causal=True)
    _, probs = dense_attention(q, k, v, allowed)
    p = attention_target(probs)
    assert torch.all(p >= 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 8))
    log_p = torch.log(p)  # -inf outside the mask, as the masked scores are
    assert float(indexer_kl(p, log_p, allowed).abs()) < 1e-6
    assert float(indexer_kl(p, torch.randn(1, 8, 8, generator=gen), allowed)) > 1e-3


def test_sparse_phase_isolates_indexer_and_main_gradients():
    torch.manual_seed(4)
    block = SparseSelfAttention(16, DSAConfig(heads=2, indexer_heads=2, indexer_dim=4, top_k=5))
    with torch.no_grad():
        block.out.weight.normal_(0, 0.3)
    x = torch.randn(2, 12, 16, requires_grad=True)
    y, kl = block(x, torch.arange(12))
    indexer = list(block.indexer.parameters())
    main = [p for n, p in block.named_parameters() if not n.startswith("indexer.")]
    task = y.pow(2).mean()
    g_task = torch.autograd.grad(task, indexer, retain_graph=True, allow_unused=True)
    assert all(g is None or torch.all(g == 0) for g in g_task)
    g_kl = torch.autograd.grad(kl, [*main, x], retain_graph=True, allow_unused=True)
    assert all(g is None or torch.all(g == 0) for g in g_kl)
    g_idx = torch.autograd.grad(kl, indexer, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in g_idx)


def test_selection_is_deterministic_and_independent_of_the_batch():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(3, 64, 64, generator=gen)
    scores[1, :, ::2] = 0.5  # many ties
    a, _ = select_topk(scores, 16, None)
    b, _ = select_topk(scores.clone(), 16, None)
    c, _ = select_topk(scores[[2, 1, 0]], 16, None)
    assert torch.equal(a, b)
    assert torch.equal(a, c[[2, 1, 0]])
    assert torch.all(a.diff(dim=-1) > 0)


@pytest.mark.parametrize(("causal", "budget"), [(False, 1 << 20), (True, 1 << 20), (True, 300)])
def test_chunked_indexer_selection_equals_topk_of_the_full_score_matrix(
    causal, budget, monkeypatch
):
    monkeypatch.setattr(dsa, "SCORE_BUDGET", budget)  # 300: 2 queries per chunk, not 7
    assert dsa.score_chunk(7, 3, 45) == (7 if budget > 300 else 2)
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 45, 3, 8, generator=gen)
    k = torch.randn(2, 45, 8, generator=gen)
    w = torch.randn(2, 45, 3, generator=gen)
    allowed = allowed_mask(torch.arange(45) // 5, causal)
    full = select_topk(index_scores(q, k, w, chunk=7), 12, allowed)
    fused = indexer_topk(q, k, w, 12, allowed, chunk=7)
    assert torch.equal(fused[0], full[0]) and torch.equal(fused[1], full[1])
    other = indexer_topk(q, k, w * -1, 12, allowed, chunk=7)  # a different score: it matters
    assert not torch.equal(other[0], full[0])


def test_inference_path_computes_what_the_training_path_computes():
    torch.manual_seed(7)
    cfg = DSAConfig(heads=2, indexer_heads=2, indexer_dim=4, top_k=6, causal=True, query_chunk=5)
    block = SparseSelfAttention(16, cfg)
    with torch.no_grad():
        block.out.weight.normal_(0, 0.3)
    x = torch.randn(2, 24, 16)
    frames = torch.arange(24) // 4
    trained, kl = block(x, frames)  # grad on: full scores, probabilities, KL
    with torch.no_grad():
        inferred, kl0 = block(x, frames)  # chunked selection, no probabilities
    torch.testing.assert_close(inferred, trained.detach(), rtol=0, atol=0)
    assert float(kl) > 0 and float(kl0) == 0
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    idx, valid = select_topk(torch.randn(1, 24, 24), 6, allowed_mask(frames, True))
    out, probs = sparse_attention(q, k, v, idx, valid, impl="csr", need_probs=False)
    ref, _ = sparse_attention(q, k, v, idx, valid, impl="gather")
    assert probs is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
