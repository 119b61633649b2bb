"""Engram stage: memory bank contents, split handling, determinism and the lookup contract."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from generators.blocks.engram_hash import (
    assign_codes,
    flat_indices,
    lookup,
    ngram_context,
    read_bank,
)
from storage.store import ArtifactStore
from tasks.base import AggregateInputs, FailureKind, ItemContext, ItemFailure, ItemInputs
from tasks.engram import EngramStage
from tasks.engram_config import EngramConfig
from tasks.split import heldout_score
from tests.features_helpers import env_for, synthetic_features

D, C, H, W = 8, 2, 4, 4
CENTRES = np.eye(D, dtype=np.float32)[:4] * 10.0  # 4 well separated audio clusters


def split_ids(fraction: float, n_train: int, n_held: int) -> tuple[list[str], list[str]]:
    train, held = [], []
    i = 0
    while len(train) < n_train or len(held) < n_held:
        cid = f"clip{i:03d}"
        (held if heldout_score(cid, 0) < fraction else train).append(cid)
        i += 1
    return train[:n_train], held[:n_held]


def synth_clip(tmp_path: Path, cid: str, num_frames: int, seed: int):
    rng = np.random.default_rng(seed)
    true_codes = rng.integers(0, 4, size=num_frames)
    audio = CENTRES[true_codes][:, None, :] + 0.01 * rng.standard_normal((num_frames, 2, D))
    latents = rng.standard_normal((num_frames, C, H, W)).astype(np.float32)
    feats = synthetic_features(tmp_path, cid, audio.astype(np.float32), latents)
    return ItemInputs(item_id=cid, records={"features": feats}), true_codes


def build(tmp_path: Path, items, holdout=0.5, **cfg):
    stage = EngramStage(EngramConfig(**cfg), env_for(tmp_path, holdout_fraction=holdout))
    stage.setup()
    ctx = ItemContext(ArtifactStore(str(tmp_path / "store")), "engram", "engram", "b" * 40)
    try:
        rec = stage.process(AggregateInputs(item_id="engram", items=items), ctx)
    finally:
        ctx.close()
    path = ArtifactStore(str(tmp_path / "store"))._path(rec.bank.uri)
    return stage, rec, read_bank(path)


def stored(tmp_path, item: ItemInputs, family: str, name: str) -> torch.Tensor:
    from safetensors.torch import load_file

    ref = item.records["features"].file(family).artifact
    return load_file(ArtifactStore(str(tmp_path / "store"))._path(ref.uri))[name].float()


@pytest.fixture
def dataset(tmp_path):
    train, held = split_ids(0.5, 3, 1)
    items, codes = [], {}
    for k, cid in enumerate(train + held):
        item, c = synth_clip(tmp_path, cid, num_frames=30 + 5 * k, seed=k)
        items.append(item)
        codes[cid] = c
    return train, held, items, codes


def test_bank_built_from_training_clips_only(tmp_path, dataset):
    train, held, items, _ = dataset
    stage, rec, bank = build(tmp_path, items, codebook_size=4, table_size=31)
    assert not stage.accepts(held[0], {}) and all(stage.accepts(c, {}) for c in train)
    assert rec.num_clips == 3
    assert rec.num_frames == sum(it.records["features"].num_frames for it in items[:3])
    assert rec.value_shape == [C, H // 2, W] and rec.used_codes == 4
    assert set(rec.occupied_slots) == {"2", "3"} and set(rec.collision_rate) == {"2", "3"}
    assert int(bank["unigram_counts"].sum()) == rec.num_frames
    per_head = bank["table_counts"].view(-1)
    primes = bank["primes"]
    offsets = bank["offsets"]
    for o in range(primes.shape[0]):
        for h in range(primes.shape[1]):
            lo = int(offsets[o, h])
            assert int(per_head[lo : lo + int(primes[o, h])].sum()) == rec.num_frames
    rows = rec.stats_rows()["engram_stats"]
    assert [r["ngram_order"] for r in rows] == [2, 3]


def test_codes_recover_the_audio_clusters(tmp_path, dataset):
    _, _, items, true = dataset
    _, _, bank = build(tmp_path, items, codebook_size=4)
    mapping: dict[int, set[int]] = defaultdict(set)
    for item in items[:3]:
        got = assign_codes(bank["codebook"], stored(tmp_path, item, "hubert", "features").numpy())
        for a, b in zip(true[item.item_id], got, strict=True):
            mapping[int(a)].add(int(b))
    assert all(len(v) == 1 for v in mapping.values())
    assert len({next(iter(v)) for v in mapping.values()}) == 4  # a bijection


def test_slot_values_are_means_of_frames_that_hashed_there(tmp_path, dataset):
    _, _, items, _ = dataset
    _, _, bank = build(tmp_path, items, codebook_size=4, table_size=13, num_heads=2)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = defaultdict(int)
    for item in items[:3]:
        codes = assign_codes(bank["codebook"], stored(tmp_path, item, "hubert", "features"))
        mouth = stored(tmp_path, item, "vae_latents", "latents")[:, :, H // 2 :, :]
        for t, row in enumerate(flat_indices(bank, codes)):
            for slot in row.tolist():
                sums[slot] = sums.get(slot, 0) + mouth[t]
                counts[slot] += 1
    assert set(counts) == set(torch.nonzero(bank["table_counts"]).flatten().tolist())
    for slot, n in counts.items():
        assert int(bank["table_counts"][slot]) == n
        torch.testing.assert_close(bank["table_values"][slot], sums[slot] / n)


def test_lookup_returns_mean_latent_of_matching_bigrams(tmp_path, dataset):
    """One order, one head, a table far larger than the n-gram space: no collisions, so a
    frame's retrieved prior is exactly the mean mouth latent over training frames with the
    same (x_t, x_{t-1})."""
    _, held, items, _ = dataset
    _, rec, bank = build(
        tmp_path, items, codebook_size=4, ngram_orders=[2], num_heads=1, table_size=1009
    )
    assert rec.collision_rate == {"2": 0.0}
    groups: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)
    per_clip = []
    for item in items[:3]:
        codes = assign_codes(bank["codebook"], stored(tmp_path, item, "hubert", "features"))
        mouth = stored(tmp_path, item, "vae_latents", "latents")[:, :, H // 2 :, :]
        for t, (a, b) in enumerate(ngram_context(codes, 2, pad_id=4).tolist()):
            groups[(a, b)].append(mouth[t])
        per_clip.append(codes)
    for codes in per_clip:
        prior = lookup(bank, codes)
        assert prior.shape == (len(codes), C, H // 2, W)
        for t, key in enumerate(ngram_context(codes, 2, pad_id=4).tolist()):
            torch.testing.assert_close(prior[t], torch.stack(groups[tuple(key)]).mean(0))
    # (code, pad) bigrams exist only at clip starts: 3 clips cannot cover all 4 codes, so a
    # sequence starting with another code reads an empty slot and gets the unigram mean
    start = next(c for c in range(4) if (c, 4) not in groups)
    prior = lookup(bank, np.array([start, start]))
    torch.testing.assert_close(prior[0], bank["unigram_values"][start])
    assert held  # the held-out clip exists but never entered the bank


def test_deterministic_and_independent_of_item_order(tmp_path, dataset):
    _, _, items, _ = dataset
    _, rec1, bank1 = build(tmp_path, items, codebook_size=4, seed=3)
    _, rec2, bank2 = build(tmp_path, list(reversed(items)), codebook_size=4, seed=3)
    assert rec1.model_dump(exclude={"bank"}) == rec2.model_dump(exclude={"bank"})
    for key in bank1:
        torch.testing.assert_close(bank1[key], bank2[key], rtol=0, atol=0)


def test_typed_failures(tmp_path):
    train, _ = split_ids(0.0, 2, 0)
    few, _ = synth_clip(tmp_path, train[0], num_frames=3, seed=0)
    with pytest.raises(ItemFailure) as err:
        build(tmp_path, [few], holdout=0.0, codebook_size=16)
    assert err.value.kind == FailureKind.FORMAT and "codebook_size" in err.value.message
    with pytest.raises(ItemFailure):
        build(tmp_path, [], holdout=0.0)
    # latents with a different frame count than the audio features
    rng = np.random.default_rng(0)
    bad = synthetic_features(
        tmp_path,
        train[1],
        rng.standard_normal((20, 2, D)).astype("f4"),
        rng.standard_normal((18, C, H, W)).astype("f4"),
    )
    bad = bad.model_copy(update={"num_frames": 20})
    with pytest.raises(ItemFailure) as err:
        build(
            tmp_path,
            [ItemInputs(item_id=train[1], records={"features": bad})],
            holdout=0.0,
            codebook_size=4,
        )
    assert err.value.kind == FailureKind.MISALIGNED


def test_config_validation():
    with pytest.raises(ValueError):
        EngramConfig(ngram_orders=[1, 2])
    with pytest.raises(ValueError):
        EngramConfig(ngram_orders=[2, 2])
    assert EngramConfig(ngram_orders=[3, 2]).ngram_orders == [2, 3]


def test_features_stage_output_builds_a_bank(tmp_path, monkeypatch):
    """The real chain: tiny-model features of two mp4 clips -> memory bank -> lookup."""
    from tests.features_helpers import commit_clip, make_features_stage, run_item

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fstage = make_features_stage(tmp_path)
    train, _ = split_ids(0.0, 2, 0)
    items = []
    for k, cid in enumerate(train):
        rec, _ = run_item(fstage, tmp_path, commit_clip(tmp_path, cid, num_frames=12, seed=k))
        items.append(ItemInputs(item_id=cid, records={"features": rec}))
    _, bank_rec, bank = build(tmp_path, items, holdout=0.0, codebook_size=4)
    assert bank_rec.num_clips == 2 and bank_rec.num_frames == 24
    assert bank_rec.value_shape == [16, 4, 8]  # 64 px crops -> 8x8 latents, lower 4 rows
    assert bank["codebook"].shape == (4, 32)
    codes = assign_codes(bank["codebook"], stored(tmp_path, items[0], "hubert", "features"))
    prior = lookup(bank, codes)
    assert prior.shape == (12, 16, 4, 8) and torch.isfinite(prior).all()
