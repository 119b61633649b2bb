"""Engram module: the seven correctness tests of training.md §3.3 (generators.blocks.engram)."""

from __future__ import annotations

import numpy as np
import torch

from generators.blocks.config import EngramConfig
from generators.blocks.engram import Engram
from generators.blocks.engram_hash import collision_rates

CFG = EngramConfig(vocab_size=16, orders=[2, 3], heads_per_order=3, table_size=97, head_dim=4)


def _module(cfg: EngramConfig = CFG, channels: int = 8, streams: int = 2, seed: int = 0) -> Engram:
    torch.manual_seed(seed)
    return Engram(cfg, channels, streams)


def _with_values(m: Engram) -> Engram:
    with torch.no_grad():
        m.value.weight.normal_(0, 0.5)
        m.conv.weight.normal_(0, 0.5)
    return m


def test_hash_is_deterministic_in_range_and_matches_a_hand_computed_example():
    codes = np.random.default_rng(0).integers(0, 16, size=40)
    a, b = _module(seed=0), _module(seed=1)  # two "ranks": different torch seeds, same config
    rows = a.rows(codes)
    np.testing.assert_array_equal(rows, b.rows(codes))
    np.testing.assert_array_equal(rows[10:20], a.rows(codes)[10:20])
    primes, offsets = a.primes.numpy().reshape(-1), a.offsets.numpy().reshape(-1)
    assert len(set(primes.tolist())) == primes.size and np.all(primes >= 97)
    assert np.all(a.multipliers.numpy() % 2 == 1)
    assert np.all(rows >= offsets[None]) and np.all(rows < (offsets + primes)[None])
    m = a.multipliers.numpy()
    t = 7
    mix = (codes[t] * m[0]) ^ (codes[t - 1] * m[1])
    assert rows[t, 0] == offsets[0] + mix % primes[0]
    mix3 = mix ^ (codes[t - 2] * m[2])
    assert rows[t, 3] == offsets[3] + mix3 % primes[3]


def test_causal_window_perturbing_the_next_code_leaves_the_past_unchanged():
    m = _with_values(_module())
    codes = np.random.default_rng(1).integers(0, 16, size=12)
    later = codes.copy()
    later[6] = (later[6] + 1) % 16
    r0, r1 = m.rows(codes), m.rows(later)
    np.testing.assert_array_equal(r0[:6], r1[:6])
    assert not np.array_equal(r0[6:], r1[6:])
    s = torch.randn(12, 2, 8, 3, 3)
    out0 = m(s, torch.from_numpy(r0), frames=12)
    out1 = m(s, torch.from_numpy(r1), frames=12)
    torch.testing.assert_close(out0[:6], out1[:6], rtol=0, atol=0)
    assert not torch.allclose(out0[6:], out1[6:])
    # the centred window is the explicit alternative: it reads one code ahead for trigrams
    centred = Engram(CFG.model_copy(update={"window": "centred"}), 8, 2)
    c0, c1 = centred.rows(codes), centred.rows(later)
    assert not np.array_equal(c0[5], c1[5])


def test_bigram_uses_exactly_the_current_and_previous_code_with_padding_at_start():
    m = _module()
    codes = np.array([3, 9, 4, 4, 15])
    rows = m.rows(codes)
    mult, primes, offsets = m.multipliers.numpy(), m.primes.numpy(), m.offsets.numpy()
    pad = m.pad_id
    for t in range(len(codes)):
        prev = codes[t - 1] if t > 0 else pad
        for h in range(3):
            mix = (codes[t] * mult[0]) ^ (prev * mult[1])
            assert rows[t, h] == offsets[0, h] + mix % primes[0, h]
    changed = codes.copy()
    changed[0] = 5  # only frames 0 and 1 read code 0 through a bigram
    diff = m.rows(changed)[:, :3] != rows[:, :3]
    assert diff[:2].all() and not diff[2:].any()


def test_gate_range_orthogonal_half_and_finite_gradient_at_zero():
    m = _module(channels=4, streams=1)
    rows = torch.from_numpy(m.rows(np.arange(6) % 16))
    s = torch.randn(6, 1, 4, 2, 2)
    alpha = m.gate(s, m.memory(rows))
    assert torch.all((alpha > 0) & (alpha < 1))
    with torch.no_grad():
        m.key.zero_()
        m.key[0, 0, 0] = 1.0  # k = (e_0, 0, 0, 0)
    s0 = torch.randn(6, 1, 4, 2, 2)
    s0[:, :, 0] = 0.0  # h ⟂ k at every position
    s0.requires_grad_(True)
    alpha0 = m.gate(s0, m.memory(rows))
    torch.testing.assert_close(alpha0, torch.full_like(alpha0, 0.5), rtol=0, atol=0)
    alpha0.sum().backward()
    assert torch.isfinite(s0.grad).all()


def test_only_looked_up_rows_receive_gradient():
    m = _with_values(_module())
    codes = np.array([1, 2, 3, 1, 2, 3, 7, 7])
    rows = m.rows(codes)
    out = m(torch.randn(8, 2, 8, 2, 2), torch.from_numpy(rows), frames=8)
    out.pow(2).sum().backward()
    touched = torch.zeros(m.table.num_embeddings, dtype=torch.bool)
    touched[torch.from_numpy(rows.reshape(-1))] = True
    grad_rows = m.table.weight.grad.abs().sum(1) > 0
    assert torch.equal(grad_rows, touched)


def test_exact_identity_at_init():
    m = _module()
    s = torch.randn(8, 2, 8, 3, 3)
    rows = torch.from_numpy(m.rows(np.arange(8) % 16))
    torch.testing.assert_close(m(s, rows, frames=4), s, rtol=0, atol=0)
    assert not torch.equal(_with_values(m)(s, rows, frames=4), s)


def test_collision_rate_falls_with_more_heads():
    rng = np.random.default_rng(3)
    pairs = np.unique(rng.integers(0, 64, size=(6000, 2)), axis=0)[:2000]
    codes = pairs.reshape(-1)  # bigram (pairs[i,0], pairs[i,1]) sits at frame 2i+1
    rates = {}
    for heads in (1, 2, 4):
        cfg = EngramConfig(vocab_size=64, orders=[2], heads_per_order=heads, table_size=4099)
        rows = Engram(cfg, 4).rows(codes)[1::2]
        rates[heads] = collision_rates(rows)
    all1, all2, all4 = rates[1][0], rates[2][0], rates[4][0]
    assert all2 < 0.6 * all1 and all4 < 0.6 * all2
    per_head = [rates[h][1] for h in (1, 2, 4)]
    assert max(per_head) - min(per_head) < 0.05  # the per-head rate depends on table size only
