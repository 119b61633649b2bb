"""The official MuseTalk 1.5 UNet through the ``musetalk15`` family: Whisper windowing and
positional encoding as the official inference computes them, strict loading of both release
forms, clear refusals of layouts it cannot read, and ``sample`` = the UNet on the official
input."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel

from generators import registry
from generators.family_config import DataLayout
from generators.musetalk15.official import (
    OfficialUNetSpec,
    positional_encoding,
    whisper_window,
)
from models.musetalk15_official import (
    build_tiny_official_unet,
    save_official_unet,
    tiny_musetalk_config,
)
from models.registry import ModelUnavailableError

LAYOUT = DataLayout(shapes={"vae_latents": [4, 8, 8], "whisper": [2, 5, 384], "hubert": [2, 32]})


def official_chunks(whisper: torch.Tensor) -> torch.Tensor:
    """``get_whisper_chunk`` written out as the official code does it, for ``(T, 2, L, D)``
    features of a 25 fps clip: 50 Hz sequence, 4 zero steps left, 12 right, frame ``i``
    takes padded steps ``[2i, 2i + 10)``, ``'b c h w -> b (c h) w'``."""
    t, s, layers, d = whisper.shape
    seq = whisper.reshape(t * s, layers, d).float()
    padded = torch.cat([torch.zeros(2 * 2, layers, d), seq, torch.zeros(2 * 3 * 2, layers, d)])
    chunks = [padded[math.floor(i * 2.0) : math.floor(i * 2.0) + 10] for i in range(t)]
    assert all(c.shape[0] == 10 for c in chunks)
    return torch.stack(chunks).reshape(t, 10 * layers, d)


def test_whisper_window_is_the_official_chunk_with_zeros_outside_the_clip():
    t, layers, d = 4, 3, 2
    # value encodes (frame, step, layer, dim): 1000 f + 100 s + 10 l + d + 1 (never 0)
    f, s, ly, dd = torch.meshgrid(
        torch.arange(t), torch.arange(2), torch.arange(layers), torch.arange(d), indexing="ij"
    )
    whisper = (1000 * f + 100 * s + 10 * ly + dd + 1).float()
    got = whisper_window(whisper, torch.arange(t))
    assert got.shape == (t, 10 * layers, d)
    assert torch.equal(got, official_chunks(whisper))
    # frame 0: steps -4..-1 are zeros (4 steps x 3 layers), then step 0 layer 0, layer 1, ...
    assert torch.equal(got[0, : 4 * layers], torch.zeros(4 * layers, d))
    assert got[0, 4 * layers].tolist() == [1.0, 2.0]  # frame 0, step 0, layer 0
    assert got[0, 4 * layers + 1].tolist() == [11.0, 12.0]  # same step, layer 1
    assert got[0, 5 * layers].tolist() == [101.0, 102.0]  # frame 0, step 1, layer 0
    assert got[0, 9 * layers + 2].tolist() == [2121.0, 2122.0]  # frame 2, step 1, layer 2
    # frame 2: steps 0..9 = frames 0..4; frame 4 does not exist -> the last 2 steps are zero
    assert got[2, 0].tolist() == [1.0, 2.0]
    assert torch.equal(got[2, 8 * layers :], torch.zeros(2 * layers, d))
    # last frame: frames t-3 .. t-1 real, two frames of zeros after
    assert got[t - 1, 0].tolist() == [1000.0 * (t - 3) + 1, 1000.0 * (t - 3) + 2]
    assert torch.equal(got[t - 1, 6 * layers :], torch.zeros(4 * layers, d))
    # any subset of frames gives the same rows
    assert torch.equal(whisper_window(whisper, torch.tensor([3, 1])), got[[3, 1]])


def test_positional_encoding_is_musetalks_interleaved_sinusoid():
    pe = positional_encoding(50, 384)
    assert pe.shape == (50, 384)
    for pos in (0, 1, 7, 49):
        for i in (0, 1, 5, 100, 191):
            angle = pos / 10000 ** (2 * i / 384)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    assert torch.equal(pe[0, 0::2], torch.zeros(192)) and torch.equal(pe[0, 1::2], torch.ones(192))
    with pytest.raises(ValueError, match="even"):
        positional_encoding(4, 7)


@pytest.fixture(scope="module")
def family():
    return registry.get("musetalk15")()


@pytest.mark.parametrize("as_safetensors", [False, True], ids=["unet.pth", "unet.safetensors"])
def test_load_official_reads_both_release_forms_strictly(family, tmp_path, as_safetensors):
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**tiny_musetalk_config())
    written = save_official_unet(tmp_path, unet, as_safetensors)
    spec, model = family.load_official(tmp_path, LAYOUT)
    assert isinstance(spec, OfficialUNetSpec) and spec.official
    assert (spec.latent_channels, spec.audio_dim, spec.audio_layers) == (4, 384, 5)
    assert (spec.audio_window_frames, spec.audio_tokens) == (2, 50)
    assert not model.training
    theirs = unet.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    # the official variant reads Whisper and both latents, no HuBERT, no bank
    assert family.features_for(spec) == {"vae_latents": "latents", "whisper": "features"}
    assert family.extra_tensors_for(spec) == {"vae_latents": ("masked_latents",)}
    assert not family.uses_memory_bank_for(spec)
    # strict: one tensor missing from the release is an error, not a silent random init
    state = {k: v for k, v in theirs.items() if k != "conv_out.bias"}
    written.unlink()
    if as_safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(written))
    else:
        torch.save(state, written)
    with pytest.raises(RuntimeError, match=r"conv_out\.bias"):
        family.load_official(tmp_path, LAYOUT)


def test_the_trained_path_keeps_its_features(family):
    from generators.musetalk15.model import make_spec

    spec = make_spec(16, 32, 8, tiny=True)
    assert family.features_for(spec) == {"vae_latents": "latents", "hubert": "features"}
    assert family.extra_tensors_for(spec) == {} and family.uses_memory_bank_for(spec)


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"vae_latents": [16, 8, 8], "whisper": [2, 5, 384]}, "4-channel SD-VAE latents"),
        ({"vae_latents": [4, 8, 8], "hubert": [2, 32]}, "features.whisper"),
        ({"vae_latents": [4, 8, 8], "whisper": [2, 3, 32]}, r"\(2, L\+1, 384\)"),
    ],
    ids=["flux-latents", "no-whisper", "whisper-width"],
)
def test_layouts_the_official_unet_cannot_read_fail_clearly(family, tmp_path, shapes, message):
    build_tiny_official_unet(tmp_path, seed=0)
    with pytest.raises(ValueError, match=message):
        family.load_official(tmp_path, DataLayout(shapes=shapes))


def test_a_folder_without_the_release_files_or_of_another_layout_is_refused(family, tmp_path):
    with pytest.raises(ModelUnavailableError, match=r"musetalk\.json"):
        family.load_official(tmp_path, LAYOUT)
    torch.manual_seed(0)
    cfg = {**tiny_musetalk_config(), "in_channels": 12}  # a 3-input (trained-family) layout
    save_official_unet(tmp_path, UNet2DConditionModel(**cfg), False)
    with pytest.raises(ValueError, match="2 × out_channels"):
        family.load_official(tmp_path, LAYOUT)


def test_sample_is_the_unet_on_the_hand_assembled_official_input(family, tmp_path):
    build_tiny_official_unet(tmp_path, seed=5)
    spec, model = family.load_official(tmp_path, LAYOUT)
    gen = torch.Generator().manual_seed(0)
    t = 7
    latents = torch.randn(t, 4, 8, 8, generator=gen).half()
    masked = torch.randn(t, 4, 8, 8, generator=gen).half()
    whisper = torch.randn(t, 2, 5, 384, generator=gen).half()
    feats = {"vae_latents": latents, "vae_latents/masked_latents": masked, "whisper": whisper}
    clip = family.prepare_clip(spec, feats, None, 0)  # no memory bank needed
    frames = torch.tensor([0, 3, 6])
    with torch.inference_mode():
        got = family.sample(model, clip, frames)
        # the official inference, by hand: cat([masked, ref = the frame]), chunks + PE, t = 0
        x = torch.cat([masked[frames].float(), latents[frames].float()], dim=1)
        tokens = official_chunks(whisper)[frames] + positional_encoding(50, 384)[None]
        direct = model(x, torch.tensor([0]), encoder_hidden_states=tokens).sample
    assert got.shape == (3, 4, 8, 8)
    torch.testing.assert_close(got, direct, atol=1e-5, rtol=1e-5)
    # the reference is each frame itself: the configured reference frame changes nothing
    other = family.prepare_clip(spec, feats, None, 5)
    with torch.inference_mode():
        assert torch.equal(family.sample(model, other, frames), got)
        # and the audio matters: another frame's window gives another prediction
        shifted = model(x, torch.tensor([0]), encoder_hidden_states=tokens.roll(1, 0)).sample
    assert (shifted - direct).abs().max() > 1e-4
    without = {k: v for k, v in feats.items() if "/" not in k}
    with pytest.raises(ValueError, match=r"features\.masked_latents: true"):
        family.prepare_clip(spec, without, None, 0)
