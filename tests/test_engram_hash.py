"""Engram hashing invariants (training.md §3.3 correctness tests 1, 2, 3 and 7)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from generators.blocks.engram_hash import (
    _is_prime,
    assign_codes,
    collision_rates,
    hash_ngrams,
    lookup,
    make_multipliers,
    make_primes,
    ngram_context,
)

K = 16
PAD = K


def params(orders=(2, 3), heads=4, table=31, seed=0):
    primes = make_primes(table, len(orders), heads)
    mult = make_multipliers(seed, max(orders), K + 1)
    return mult, primes, list(orders)


def test_primes_distinct_and_multipliers_odd():
    primes = make_primes(100, 3, 5)
    flat = primes.ravel().tolist()
    assert len(set(flat)) == 15
    assert all(_is_prime(p) and p >= 100 for p in flat)
    assert flat[:5] == [101, 103, 107, 109, 113]  # smallest primes >= the minimum
    m = make_multipliers(7, 3, K + 1)
    assert m.dtype == np.int64 and (m % 2 == 1).all() and (m > 0).all()
    assert (m * (K + 1) > 0).all()  # no int64 overflow for any code incl. pad
    np.testing.assert_array_equal(m, make_multipliers(7, 3, K + 1))
    assert not np.array_equal(m, make_multipliers(8, 3, K + 1))


def test_hash_matches_hand_computed_xor_mod():
    mult, primes, orders = params(orders=(2, 3), heads=2)
    codes = np.array([3, 5, 11])
    idx = hash_ngrams(codes, mult, primes, orders, PAD)
    m0, m1, m2 = (int(x) for x in mult)
    for h in range(2):
        p2, p3 = int(primes[0, h]), int(primes[1, h])
        assert idx[0, 0, h] == ((3 * m0) ^ (PAD * m1)) % p2
        assert idx[1, 0, h] == ((5 * m0) ^ (3 * m1)) % p2
        assert idx[2, 0, h] == ((11 * m0) ^ (5 * m1)) % p2
        assert idx[0, 1, h] == ((3 * m0) ^ (PAD * m1) ^ (PAD * m2)) % p3
        assert idx[2, 1, h] == ((11 * m0) ^ (5 * m1) ^ (3 * m2)) % p3


def test_hash_deterministic_and_in_range():
    mult, primes, orders = params()
    rng = np.random.default_rng(0)
    codes = rng.integers(0, K, size=500)
    a = hash_ngrams(codes, mult, primes, orders, PAD)
    np.testing.assert_array_equal(a, hash_ngrams(codes.copy(), mult, primes, orders, PAD))
    assert a.shape == (500, 2, 4)
    assert (a >= 0).all() and (a < primes[None]).all()
    # same n-gram at different positions / in another sequence -> same slots
    seq2 = np.concatenate([rng.integers(0, K, size=7), codes[100:103]])
    b = hash_ngrams(seq2, mult, primes, orders, PAD)
    np.testing.assert_array_equal(b[-1], a[102])
    # flat offsets keep every head inside its own range
    offsets = np.concatenate([[0], np.cumsum(primes.ravel())[:-1]]).reshape(primes.shape)
    flat = a + offsets[None]
    assert (flat >= offsets[None]).all() and (flat < (offsets + primes)[None]).all()


def test_causality_future_codes_do_not_change_past():
    mult, primes, orders = params()
    codes = np.random.default_rng(1).integers(0, K, size=64)
    base = hash_ngrams(codes, mult, primes, orders, PAD)
    for t in (0, 10, 40, 62):
        pert = codes.copy()
        pert[t + 1 :] = (pert[t + 1 :] + 5) % K
        out = hash_ngrams(pert, mult, primes, orders, PAD)
        np.testing.assert_array_equal(out[: t + 1], base[: t + 1])
        assert not np.array_equal(out[t + 1], base[t + 1])


def test_bigram_uses_exactly_current_and_previous_code():
    mult, primes, _ = params(orders=(2,), heads=3)
    codes = np.random.default_rng(2).integers(0, K, size=40)
    idx = hash_ngrams(codes, mult, primes, [2], PAD)
    ctx = ngram_context(codes, 2, PAD)
    assert ctx[0].tolist() == [codes[0], PAD]  # padding before the clip start
    for t in range(1, 40):
        assert ctx[t].tolist() == [codes[t], codes[t - 1]]
        # the bigram alone (as a 2-code sequence) hashes to the same slots
        np.testing.assert_array_equal(
            hash_ngrams(codes[t - 1 : t + 1], mult, primes, [2], PAD)[1], idx[t]
        )
    # x_{t-2} does not enter the bigram
    changed = codes.copy()
    changed[5] = (changed[5] + 1) % K
    out = hash_ngrams(changed, mult, primes, [2], PAD)
    np.testing.assert_array_equal(out[7:], idx[7:])
    # at t = 0 the previous code is the pad id, not code 0
    zero_first = np.array([codes[0]])
    m0, m1 = int(mult[0]), int(mult[1])
    assert idx[0, 0, 0] == ((int(codes[0]) * m0) ^ (PAD * m1)) % int(primes[0, 0])
    assert hash_ngrams(zero_first, mult, primes, [2], PAD)[0, 0, 0] == idx[0, 0, 0]


def test_collision_rate_falls_with_more_heads():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, K, size=4000)
    rows = ngram_context(codes, 3, PAD)
    _, first = np.unique(rows, axis=0, return_index=True)
    rates = []
    per_head = []
    for heads in (1, 2, 4, 8):
        mult, primes, _ = params(orders=(3,), heads=heads, table=2053)
        idx = hash_ngrams(codes, mult, primes, [3], PAD)[first, 0, :]
        all_heads, each = collision_rates(idx)
        rates.append(all_heads)
        per_head.append(each)
    assert len(first) > 2000  # load factor > 1 per head
    assert rates[0] > 0.5
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert rates[-1] < 0.15
    assert max(per_head) - min(per_head) < 0.05  # one head's rate depends on its size only


def test_assign_codes_nearest_centroid():
    codebook = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
    feats = np.array([[[1, 1], [0, 0]], [[9, 1], [10, 0]], [[0, 9], [1, 11]]], np.float32)
    assert assign_codes(codebook, feats).tolist() == [0, 1, 2]
    assert assign_codes(torch.from_numpy(codebook), feats.mean(1)).tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        assign_codes(codebook, np.zeros((3, 5), np.float32))


def test_lookup_rejects_bad_codes():
    mult, primes, orders = params(orders=(2,), heads=1)
    bank = {
        "multipliers": torch.from_numpy(mult),
        "primes": torch.from_numpy(primes),
        "orders": torch.tensor(orders),
        "offsets": torch.zeros_like(torch.from_numpy(primes)),
        "pad_id": torch.tensor([PAD]),
        "table_values": torch.zeros(int(primes.sum()), 1, 1, 1),
        "table_counts": torch.zeros(int(primes.sum()), dtype=torch.int64),
        "unigram_values": torch.arange(K, dtype=torch.float32).view(K, 1, 1, 1),
        "unigram_counts": torch.ones(K, dtype=torch.int64),
        "global_mean": torch.zeros(1, 1, 1),
    }
    # every slot empty -> each frame gets its unigram mean
    out = lookup(bank, np.array([3, 7, 7]))
    assert out.flatten().tolist() == [3.0, 7.0, 7.0]
    with pytest.raises(ValueError):
        lookup(bank, np.array([K]))
