"""§8.5 augmentations: the structure flip matches the mirrored image; background noise;
probabilities."""

from __future__ import annotations

import json
import math
import wave

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from generators.dualforce.audio_noise import add_noise_at_snr, noisy_hubert
from generators.dualforce.augment import (
    ClipWindow,
    augment,
    flip_flame,
    flip_motion,
    horizontal_flip,
    speed_change,
    temporal_crop,
)
from generators.dualforce.config import AugmentConfig
from models.emoca import FLAME_SLICES
from models.hubert import (
    align_audio_steps,
    extract_hubert_windowed,
    load_hubert,
    make_feature_extractor,
)
from models.liveportrait import NUM_KP, motion_slices
from models.registry import ModelSpec, ensure_model, fingerprint

MIRROR = torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64))
SL = motion_slices()


def random_motion(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 133, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def liveportrait_rotation(pitch, yaw, roll) -> torch.Tensor:
    """LivePortrait's ``get_rotation_matrix`` (degrees; R = (Rz·Ry·Rx)ᵀ, row-vector convention)."""
    x, y, z = (torch.deg2rad(a) for a in (pitch, yaw, roll))
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rx = torch.stack([one, zero, zero, zero, x.cos(), -x.sin(), zero, x.sin(), x.cos()], -1)
    ry = torch.stack([y.cos(), zero, y.sin(), zero, one, zero, -y.sin(), zero, y.cos()], -1)
    rz = torch.stack([z.cos(), -z.sin(), zero, z.sin(), z.cos(), zero, zero, zero, one], -1)
    rot = rz.view(-1, 3, 3) @ ry.view(-1, 3, 3) @ rx.view(-1, 3, 3)
    return rot.transpose(1, 2)


def driving_keypoints(motion: torch.Tensor) -> torch.Tensor:
    """``scale · (kp R + exp) + [tx, ty, 0]`` — LivePortrait's transformed keypoints."""
    kp = motion[:, SL["kp"]].view(-1, NUM_KP, 3)
    exp = motion[:, SL["exp"]].view(-1, NUM_KP, 3)
    rot = liveportrait_rotation(*(motion[:, SL[k]].squeeze(1) for k in ("pitch", "yaw", "roll")))
    t = motion[:, SL["t"]].clone()
    t[:, 2] = 0
    return motion[:, SL["scale"]][:, :, None] * (kp @ rot + exp) + t[:, None]


def rodrigues(omega: torch.Tensor) -> torch.Tensor:
    theta = omega.norm(dim=-1, keepdim=True)
    k = omega / theta
    kx = torch.zeros(*omega.shape[:-1], 3, 3, dtype=omega.dtype)
    kx[..., 0, 1], kx[..., 0, 2], kx[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    kx = kx - kx.transpose(-1, -2)
    s, c = theta.sin()[..., None], theta.cos()[..., None]
    return torch.eye(3, dtype=omega.dtype) + s * kx + (1 - c) * kx @ kx


def test_flipping_twice_is_the_identity():
    motion, flame = random_motion(5), random_motion(5, 1)[:, :1].repeat(1, 159)
    assert torch.equal(flip_motion(flip_motion(motion)), motion)
    assert torch.equal(flip_flame(flip_flame(flame)), flame)
    window = window_of(6)
    twice = horizontal_flip(horizontal_flip(window))
    for name in ("latents", "motion", "flame", "hubert", "reference_tokens", "reference_latent"):
        assert torch.equal(getattr(twice, name), getattr(window, name)), name
    assert not torch.equal(horizontal_flip(window).latents, window.latents)


def test_flipped_head_pose_is_the_mirror_image_of_the_driving_keypoints():
    motion = random_motion(8)
    for k in ("pitch", "yaw", "roll"):
        motion[:, SL[k]] *= 30  # degrees
    flipped = flip_motion(motion)
    for k, sign in (("pitch", 1), ("yaw", -1), ("roll", -1), ("scale", 1)):
        assert torch.equal(flipped[:, SL[k]], sign * motion[:, SL[k]]), k
    t = SL["t"].start
    assert torch.equal(flipped[:, t], -motion[:, t])  # tx flips, ty and tz do not
    assert torch.equal(flipped[:, t + 1 : t + 3], motion[:, t + 1 : t + 3])
    # the image-space keypoints the flipped parameters describe are the mirrored ones
    assert torch.allclose(driving_keypoints(flipped), driving_keypoints(motion) @ MIRROR)


def test_flipped_flame_rotations_are_mirrored_rotations():
    flame = torch.randn(6, 159, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    flipped = flip_flame(flame)
    pose = FLAME_SLICES["pose"]
    for start in (pose.start, pose.start + 3):  # global rotation, jaw
        omega, omega_f = flame[:, start : start + 3], flipped[:, start : start + 3]
        assert torch.allclose(rodrigues(omega_f), MIRROR @ rodrigues(omega) @ MIRROR)
    cam = FLAME_SLICES["cam"]
    assert torch.equal(flipped[:, cam.start + 1], -flame[:, cam.start + 1])  # tx
    untouched = [i for i in range(159) if i not in (pose.start + 1, pose.start + 2,
                 pose.start + 4, pose.start + 5, cam.start + 1)]  # fmt: skip
    assert torch.equal(flipped[:, untouched], flame[:, untouched])


def window_of(frames: int, seed: int = 0) -> ClipWindow:
    g = torch.Generator().manual_seed(seed)
    return ClipWindow(
        torch.randn(frames, 4, 8, 8, generator=g),
        torch.randn(frames, 133, generator=g),
        torch.randn(frames, 159, generator=g),
        torch.randn(frames, 2, 16, generator=g),
        torch.randn(16, 12, generator=g),
        torch.randn(4, 8, 8, generator=g),
    )


def test_reference_grid_and_latents_mirror_with_the_image():
    window = window_of(3)
    flipped = horizontal_flip(window)
    assert torch.equal(flipped.latents, window.latents.flip(-1))
    assert torch.equal(flipped.reference_latent, window.reference_latent.flip(-1))
    grid = window.reference_tokens.view(4, 4, -1)
    assert torch.equal(flipped.reference_tokens.view(4, 4, -1), grid.flip(1))


def test_crop_and_speed_keep_streams_aligned():
    window = window_of(20)
    crop = temporal_crop(window, 5, 10)
    assert torch.equal(crop.hubert, window.hubert[5:15]) and crop.num_frames == 10
    fast = speed_change(window, 1.25)
    assert fast.num_frames == 16 and fast.hubert.shape == (16, 2, 16)
    assert torch.allclose(fast.motion[0], window.motion[0]) and torch.allclose(
        fast.motion[-1], window.motion[-1]
    )  # ends aligned
    with pytest.raises(ValueError):
        temporal_crop(window, 15, 10)


@pytest.mark.parametrize("name", ["p_temporal_crop", "p_speed", "p_color", "p_flip"])
def test_each_augmentation_fires_with_its_configured_probability(name):
    off = {"p_temporal_crop": 0.0, "p_speed": 0.0, "p_color": 0.0, "p_flip": 0.0, "p_noise": 0.0}
    window = window_of(24)
    cfg = AugmentConfig(**{**off, name: 0.3}, min_crop_frames=8)
    rng = np.random.default_rng(0)
    fired = 0
    n = 300
    for _ in range(n):
        out = augment(window, cfg, rng)
        same = out.num_frames == window.num_frames and torch.equal(out.latents, window.latents)
        fired += not same
    assert abs(fired / n - 0.3) < 3 * math.sqrt(0.3 * 0.7 / n) + 0.02
    never = AugmentConfig(**off)
    assert torch.equal(augment(window, never, rng).latents, window.latents)


def test_background_noise_is_mixed_at_the_configured_snr():
    rng = np.random.default_rng(0)
    wave = (0.3 * np.sin(np.arange(16000) / 7.0)).astype(np.float32)
    noise = rng.standard_normal(16000)
    noisy = add_noise_at_snr(wave, noise, 15.0)
    snr = 10 * np.log10(np.mean(wave.astype(np.float64) ** 2) / np.mean((noisy - wave) ** 2.0))
    assert abs(snr - 15.0) < 0.01


def test_noisy_hubert_reruns_the_features_hubert_on_the_noisy_wav(tmp_path):
    """The clip's own HuBERT, layer and alignment: at a huge SNR it reproduces the clean
    features the features stage would store; at 15 dB it differs."""
    spec = ModelSpec(family="hubert", source="hubert-tiny", tiny_random=True)
    path = ensure_model(spec, tmp_path)
    model, fe = load_hubert(path), make_feature_extractor()
    frames, fps = 20, 25.0
    wave = (0.2 * np.random.default_rng(1).standard_normal(640 * frames)).astype(np.float32)
    wav = tmp_path / "audio.wav"
    write_wav_pcm16(wav, wave)
    from generators.musetalk2.data import read_wav  # the wav as every reader sees it (int16)

    with torch.inference_mode():
        feats = extract_hubert_windowed(model, fe, read_wav(str(wav)), -1)
    clean = torch.from_numpy(align_audio_steps(feats, frames, fps)).float()
    hub = tmp_path / "hubert.safetensors"
    meta = {"model_fingerprint": json.dumps(fingerprint(spec, tmp_path).model_dump(mode="json")),
            "layer": "-1", "fps": repr(fps)}  # fmt: skip
    save_file({"features": clean}, str(hub), metadata=meta)
    same = noisy_hubert("clip", str(hub), str(wav), frames, snr_db=300.0)
    noisy = noisy_hubert("clip", str(hub), str(wav), frames, snr_db=15.0)
    assert same.shape == noisy.shape == clean.shape
    assert torch.allclose(same, clean, atol=1e-4)
    assert (noisy - clean).abs().mean() > 1e-3
    assert torch.equal(noisy, noisy_hubert("clip", str(hub), str(wav), frames, 15.0))  # seeded


def write_wav_pcm16(path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
