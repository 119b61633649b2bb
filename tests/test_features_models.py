"""VAE and HuBERT wrappers through the real from_pretrained path with tiny random weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.hubert import (
    extract_hubert,
    extract_hubert_windowed,
    hubert_num_frames,
    load_hubert,
    make_feature_extractor,
)
from models.registry import ModelSpec, ModelUnavailableError, ensure_model, fingerprint
from models.vae import decode_latents, encode_frames, latent_factors, load_vae
from tests.features_helpers import face_frames, speechlike_wave


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return ensure_model(ModelSpec(family="hubert", source="hubert-tiny", tiny_random=True), root)


@pytest.fixture(scope="module")
def hubert(hubert_dir):
    return load_hubert(hubert_dir)


@pytest.mark.parametrize(
    ("family", "channels", "scale", "shift"),
    [
        ("vae-flux1", 16, 0.3611, 0.1159),
        ("vae-sd", 4, 0.18215, 0.0),
    ],
)
def test_vae_tiny_roundtrip_through_from_pretrained(tmp_path, family, channels, scale, shift):
    spec = ModelSpec(family=family, source="models/vae", tiny_random=True)
    path = ensure_model(spec, tmp_path)
    assert (path / "config.json").exists()
    assert fingerprint(spec, tmp_path).origin == "random-init"
    vae = load_vae(path)
    assert latent_factors(vae) == pytest.approx((scale, shift))
    frames = face_frames(5, 64)
    z = encode_frames(vae, frames, batch_size=2)
    assert z.shape == (5, channels, 8, 8) and z.dtype == torch.float32
    # deterministic (posterior mode), and batching does not change the result
    torch.testing.assert_close(z, encode_frames(vae, frames, batch_size=5), atol=1e-5, rtol=1e-5)
    # the normalisation is exactly (mode - shift) * scale
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        mode = vae.encode(x).latent_dist.mode()
    torch.testing.assert_close(z, (mode - shift) * scale, atol=1e-5, rtol=1e-5)
    out = decode_latents(vae, z, batch_size=3)
    assert out.shape == frames.shape and out.dtype == np.uint8
    # decode undoes the normalisation: decoding z equals vae.decode(mode)
    with torch.no_grad():
        ref = ((vae.decode(mode).sample.clamp(-1, 1) + 1) * 127.5).round().byte()
    assert np.abs(out.astype(int) - ref.permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1


def test_vae_rejects_bad_sizes_and_missing_weights(tmp_path):
    vae = load_vae(
        ensure_model(ModelSpec(family="vae-flux1", source="v", tiny_random=True), tmp_path)
    )
    with pytest.raises(ValueError, match="multiple of 8"):
        encode_frames(vae, np.zeros((1, 60, 64, 3), np.uint8))
    with pytest.raises(ModelUnavailableError):
        load_vae("black-forest-labs/not-a-local-model", subfolder="vae")
    with pytest.raises(ModelUnavailableError):
        ensure_model(ModelSpec(family="vae-flux1", source="absent"), tmp_path)


@pytest.mark.parametrize("seconds", [0.5, 1.0, 2.0, 3.7])
def test_hubert_frame_counts_follow_formula(hubert, seconds):
    n = round(seconds * 16_000)
    expected = (n - 400) // 320 + 1
    assert hubert_num_frames(n) == expected
    assert int(hubert._get_feat_extract_output_lengths(torch.tensor(n))) == expected
    (feats,) = extract_hubert(hubert, make_feature_extractor(), [speechlike_wave(n)], layer=-1)
    assert feats.shape == (expected, 32)
    assert np.isfinite(feats).all()


def test_hubert_known_counts():
    assert [hubert_num_frames(n) for n in (399, 400, 16_000, 32_000, 160_000)] == [
        0,
        1,
        49,
        99,
        499,
    ]


def test_hubert_batch_with_masks_matches_single(hubert):
    fe = make_feature_extractor()
    waves = [speechlike_wave(8_000, 1), speechlike_wave(20_000, 2), speechlike_wave(12_345, 3)]
    batched = extract_hubert(hubert, fe, waves, layer=-1)
    for w, b in zip(waves, batched, strict=True):
        (single,) = extract_hubert(hubert, fe, [w], layer=-1)
        assert b.shape == single.shape == (hubert_num_frames(len(w)), 32)
        np.testing.assert_allclose(b, single, atol=1e-4)


def test_hubert_layer_selection(hubert):
    fe = make_feature_extractor()
    wave = speechlike_wave(16_000)
    last = extract_hubert(hubert, fe, [wave], layer=-1)[0]
    two = extract_hubert(hubert, fe, [wave], layer=2)[0]
    one = extract_hubert(hubert, fe, [wave], layer=1)[0]
    # hidden_states[2] is the last layer's output before the encoder's final LayerNorm
    with torch.no_grad():
        normed = hubert.encoder.layer_norm(torch.from_numpy(two)).numpy()
    np.testing.assert_allclose(normed, last, atol=1e-5)
    assert not np.allclose(one, two)
    for bad in (3, -2):
        with pytest.raises(ValueError, match="out of range"):
            extract_hubert(hubert, fe, [wave], layer=bad)
    with pytest.raises(ValueError, match="shorter"):
        extract_hubert(hubert, fe, [wave[:300]], layer=-1)


def test_hubert_windowed_tiles_the_step_grid(hubert):
    fe = make_feature_extractor()
    wave = speechlike_wave(3 * 16_000 + 777)
    total = hubert_num_frames(len(wave))
    full = extract_hubert(hubert, fe, [wave], layer=-1)[0]
    one_window = extract_hubert_windowed(hubert, fe, wave, window_steps=total)
    np.testing.assert_array_equal(one_window, full)
    windowed = extract_hubert_windowed(
        hubert, fe, wave, window_steps=40, context_steps=10, batch_size=2
    )
    assert windowed.shape == full.shape
    # a window's core equals the model run on exactly that segment with its context
    c0, k0, k1, c1 = 30, 40, 80, 90
    seg = wave[c0 * 320 : (c1 - 1) * 320 + 400]
    ref = extract_hubert(hubert, fe, [seg], layer=-1)[0]
    assert ref.shape[0] == c1 - c0
    np.testing.assert_allclose(windowed[k0:k1], ref[k0 - c0 : k1 - c0], atol=1e-5)
    # and stays close to the single pass (context hides most of the window edge)
    corr = np.corrcoef(windowed.ravel(), full.ravel())[0, 1]
    assert corr > 0.9


def test_flux2_vae_patchifies_and_normalises_with_its_batch_norm(tmp_path):
    from diffusers import AutoencoderKLFlux2

    from models.vae import latent_stride

    spec = ModelSpec(family="vae-flux2", source="models/vae2", tiny_random=True)
    vae = load_vae(ensure_model(spec, tmp_path))
    assert isinstance(vae, AutoencoderKLFlux2) and latent_stride(vae) == 16
    frames = face_frames(3, 64)
    z = encode_frames(vae, frames, batch_size=2)
    assert z.shape == (3, 128, 4, 4)
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        mode = vae.encode(x).latent_dist.mode()  # (3, 32, 8, 8)
    # channel 4c + 2dy + dx of cell (i, j) is mode[c, 2i + dy, 2j + dx], then batch-normed
    mean, var = vae.bn.running_mean, vae.bn.running_var
    eps = vae.config.batch_norm_eps
    c, dy, dx, i, j = 5, 1, 0, 2, 3
    k = 4 * c + 2 * dy + dx
    expected = (mode[:, c, 2 * i + dy, 2 * j + dx] - mean[k]) / torch.sqrt(var[k] + eps)
    torch.testing.assert_close(z[:, k, i, j], expected, atol=1e-5, rtol=1e-5)
    out = decode_latents(vae, z)
    with torch.no_grad():
        ref = ((vae.decode(mode).sample.clamp(-1, 1) + 1) * 127.5).round().byte()
    assert np.abs(out.astype(int) - ref.permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1
    with pytest.raises(ValueError, match="multiple of 16"):
        encode_frames(vae, np.zeros((1, 56, 64, 3), np.uint8))
