"""Frozen models of the musetalk2 losses: VGG19, LatentSync's SyncNet and its mel, the
official MuseTalk 1.5 UNet reader, and the pyramid perceptual loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from torchvision.models import vgg19

from generators.family_config import TrainingAssets
from generators.musetalk2.losses import FrozenModels, _gaussian_pyramid_level
from models.checkpoints import CheckpointMismatchError
from models.musetalk15_official import read_official_unet
from models.registry import ModelSpec, ModelUnavailableError, ensure_model
from models.stable_syncnet import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_stable_syncnet,
    mel_window,
    melspectrogram,
    sync_loss,
)
from models.vgg import SLICES, VGG19Features, load_vgg19
from models.vgg import WEIGHTS_FILE as VGG_FILE


def test_vgg19_loads_torchvisions_official_state_dict_and_cuts_musetalks_slices(tmp_path):
    torch.manual_seed(0)
    official = vgg19(weights=None)
    folder = tmp_path / "vgg19"
    folder.mkdir()
    torch.save({k: v for k, v in official.state_dict().items()}, folder / VGG_FILE)
    model = load_vgg19(folder)
    x = torch.rand(1, 3, 64, 64)
    feats = model(x)
    assert [f.shape[1] for f in feats] == [64, 128, 256, 512, 512]
    h = (x - model.mean) / model.std
    want = official.features[: SLICES[2][1]](h)  # relu3_1 is features[:12]
    torch.testing.assert_close(feats[2], want)
    state = {k: v for k, v in official.state_dict().items() if k != "features.28.bias"}
    torch.save(state, folder / VGG_FILE)
    with pytest.raises(CheckpointMismatchError):
        load_vgg19(folder)
    with pytest.raises(ModelUnavailableError, match=r"vgg19-dcbb9e9d\.pth"):
        load_vgg19(tmp_path / "missing")


def test_tiny_vgg19_goes_through_the_registry_and_the_same_loader(tmp_path):
    path = ensure_model(ModelSpec(family="vgg19", source="v", tiny_random=True), tmp_path)
    model = load_vgg19(path)
    assert isinstance(model, VGG19Features) and model.widths == (4, 8, 8, 16, 16)
    assert not any(p.requires_grad for p in model.parameters())


def test_syncnet_round_trips_its_official_format_and_refuses_the_attention_variant(tmp_path):
    path = ensure_model(
        ModelSpec(family="syncnet-latentsync", source="s", tiny_random=True), tmp_path
    )
    net = load_stable_syncnet(path)
    assert net.num_frames == 16 and net.mel_columns == 52 and net.resolution == 64
    frames, mel = torch.randn(2, 48, 32, 64), torch.randn(2, 1, 80, 52)
    v, a = net(frames, mel)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(2))
    loss = sync_loss(v, a)
    assert loss.shape == (2,) and (loss >= 0).all()
    assert float(sync_loss(v, v).max()) < 1e-5  # perfectly in sync
    conf = yaml.safe_load((path / CONFIG_FILE).read_text())
    conf["model"]["visual_encoder"]["attn_blocks"][4] = 1
    (path / CONFIG_FILE).write_text(yaml.safe_dump(conf))
    with pytest.raises(ModelUnavailableError, match="attention"):
        load_stable_syncnet(path)
    assert (path / WEIGHTS_FILE).is_file()


def test_mel_has_wav2lips_framing_range_and_frequency_placement():
    sr = 16_000
    t = np.arange(sr) / sr
    low = 0.5 * np.sin(2 * np.pi * 300 * t)
    high = 0.5 * np.sin(2 * np.pi * 3000 * t)
    m_low, m_high = melspectrogram(low), melspectrogram(high)
    assert m_low.shape == (80, sr // 200 + 1) and m_low.dtype == np.float32
    assert m_low.min() >= -4 and m_low.max() <= 4
    band_low, band_high = m_low[:, 20:60].mean(1).argmax(), m_high[:, 20:60].mean(1).argmax()
    assert band_low < 25 < band_high  # 300 Hz in the low bands, 3 kHz high up
    silence = melspectrogram(np.zeros(sr))
    assert np.allclose(silence, -4.0)  # the -100 dB floor maps to the bottom of the range
    window = mel_window(m_low, 5, 25.0, 52)  # frame 5 at 25 fps = 0.2 s = mel column 16
    assert window.shape == (80, 52) and np.array_equal(window, m_low[:, 16:68])
    assert mel_window(m_low, 10, 25.0, 52) is None  # 32 + 52 columns > 1 s of audio


def test_official_reader_needs_the_release_layout(tmp_path):
    path = ensure_model(
        ModelSpec(family="musetalk15-official", source="m", tiny_random=True), tmp_path
    )
    config, state = read_official_unet(path)
    assert config["in_channels"] == 8 and config["cross_attention_dim"] == 384
    assert "conv_in.weight" in state
    (path / "musetalk.json").unlink()
    with pytest.raises(ModelUnavailableError, match=r"musetalk\.json"):
        read_official_unet(path)


def test_pyramid_levels_follow_musetalks_anti_aliased_downsampling():
    x = torch.rand(1, 3, 32, 32)
    assert _gaussian_pyramid_level(x, 1.0) is x
    half = _gaussian_pyramid_level(x, 0.5)
    assert half.shape == (1, 3, 16, 16)
    flat = torch.full((1, 3, 32, 32), 0.7)
    torch.testing.assert_close(
        _gaussian_pyramid_level(flat, 0.25)[..., 2:-2, 2:-2], torch.full((1, 3, 4, 4), 0.7)
    )
    sigma = (1 / 0.5 - 1) / 2  # MuseTalk: kernel size 2·round(4σ)+1 = 5 at scale ½
    assert 2 * round(sigma * 4) + 1 == 5


def test_vgg_pyramid_and_pixel_terms_through_the_frozen_models(tmp_path):
    vgg = ensure_model(ModelSpec(family="vgg19", source="v", tiny_random=True), tmp_path)
    vae = ensure_model(ModelSpec(family="vae-sd", source="vae", tiny_random=True), tmp_path)
    frozen = FrozenModels(TrainingAssets(vae=str(vae), models={"vgg19": str(vgg)}))
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    pred = frozen.decode(z)
    assert pred.shape == (2, 3, 64, 64)
    real = frozen.decode(torch.randn(2, 4, 8, 8)).detach()
    w, scales = [1.0] * 5, [1.0, 0.5, 0.25, 0.125]
    same = frozen.vgg_pyramid(real, real, w, scales, 128)  # 1/8 of 128 still pools to 1×1
    assert float(same) == 0.0
    loss = frozen.vgg_pyramid(pred, real, w, scales, 128)
    loss.backward()
    assert float(loss) > 0 and z.grad.abs().sum() > 0
    assert not any(p.grad is not None for p in frozen._get("vgg19", z.device).parameters())
    with pytest.raises(ValueError, match="syncnet"):
        frozen.sync(pred, torch.zeros(1, 1, 80, 52), 2)
    assert math.isfinite(float(loss))
