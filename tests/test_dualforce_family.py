"""The ``dualforce`` family behind the registry: config, spec, weights, autoregressive sampling."""

from __future__ import annotations

import pytest
import torch

from generators import registry
from generators.dualforce.config import SIZE_PRESETS, DualForceArch
from generators.dualforce.family import DualForceFamily
from generators.dualforce.model import parameter_count
from generators.dualforce.sampler import generate
from generators.family_config import DataLayout
from generators.io import read_tensor
from tests.dualforce_helpers import (
    layout,
    one_thread,  # noqa: F401 - autouse fixture
    tiny_config,
    write_clip,
)


def test_registered_and_selected_by_the_train_config():
    from tasks.train_config import train_config

    assert "dualforce" in registry.names()
    cfg = train_config(family="dualforce", training_stage="stage1", clip_frames=16)
    fam = registry.instantiate(cfg)
    assert isinstance(fam, DualForceFamily)
    assert fam.config.training_stage == "stage1" and fam.config.clip_frames == 16
    with pytest.raises(ValueError):
        train_config(family="dualforce", training_stage="stage4")


def test_spec_takes_the_datas_shapes_and_round_trips_as_json():
    fam = DualForceFamily(tiny_config("stage2"))
    spec = fam.make_spec(layout())
    a = spec.arch
    assert (a.in_channels, a.latent_height, a.latent_width) == (4, 8, 8)
    assert (a.audio_steps_per_frame, a.audio_dim, a.image_dim) == (2, 16, 12)
    assert fam.parse_spec(spec.to_json()) == spec
    shapes = dict(layout().shapes)
    with pytest.raises(ValueError, match="square grid"):
        fam.make_spec(DataLayout(shapes={**shapes, "reference": [15, 12]}))
    with pytest.raises(ValueError, match="needs features"):
        fam.make_spec(DataLayout(shapes={k: v for k, v in shapes.items() if k != "emoca_flame"}))
    with pytest.raises(ValueError, match="multiple of the patch"):
        fam.make_spec(DataLayout(shapes={**shapes, "vae_latents": [4, 7, 8]}))


def test_mova_lite_preset_is_the_seeds_two_billion_parameter_size():
    arch = DualForceArch(**SIZE_PRESETS["mova_lite"])
    assert (arch.num_layers, arch.fusion_depth, arch.dim, arch.struct_tokens_per_frame) == (
        28, 8, 2048, 8,
    )  # fmt: skip
    counts = parameter_count(arch)  # meta device: no memory
    assert 1.8e9 < counts["video_backbone"] < 2.2e9
    assert 0.2e9 < counts["new_modules"] < 0.6e9  # §7.3: ~0.35 B of new modules


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A stage-3 checkpoint on disk (a couple of steps, so no weight is at its init)."""
    tmp = tmp_path_factory.mktemp("dualforce-family")
    clips = [write_clip(tmp, f"c{i}", 10, seed=i) for i in range(2)]
    fam = DualForceFamily(tiny_config("stage3", clip_frames=6, sampler={"steps_per_frame": 2}))
    spec = fam.make_spec(layout())
    torch.manual_seed(0)
    model = fam.build(spec)
    data = fam.load_training_data(spec, clips, None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        fam.training_step(model, fam.training_batch(data, 0, step, 2, 0, 2))["loss"].backward()
        opt.step()
        opt.zero_grad()
    path = tmp / "model.safetensors"
    fam.save_weights(path, model, spec)
    return fam, spec, path, clips


def features(clip, hubert_from=None):
    out = {f: read_tensor(clip.paths[f], name) for f, name in DualForceFamily.features.items()}
    if hubert_from is not None:
        out["hubert"] = read_tensor(hubert_from.paths["hubert"], "features")[:7]
    return {f: out[f] for f in DualForceFamily().features_for(None)}  # type: ignore[arg-type]


def test_sample_walks_a_clip_in_consecutive_ranges_like_the_generate_stage(trained):
    fam, spec, path, clips = trained
    model = registry.get("dualforce")().load_model(path, spec)  # adapters merged, eval
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    feats = features(clips[0])
    assert set(feats) == {"vae_latents", "hubert", "reference"}  # no motion/FLAME to sample
    prepared = fam.prepare_clip(spec, feats, None, reference_frame=2)
    with torch.inference_mode():
        chunks = [fam.sample(model, prepared, torch.arange(s, min(s + 4, 10))) for s in (0, 4, 8)]
        again = fam.sample(model, prepared, torch.arange(0, 4))  # frame 0 restarts the clip
        with pytest.raises(ValueError, match="asked for frame 6"):
            fam.sample(model, prepared, torch.arange(6, 8))
        with pytest.raises(ValueError, match="consecutive"):
            fam.sample(model, prepared, torch.tensor([4, 6]))
        with pytest.raises(ValueError, match="consecutive"):
            fam.sample(model, prepared, torch.arange(8, 11))
    latents = torch.cat(chunks)
    assert latents.shape == (10, 4, 8, 8) and torch.isfinite(latents).all()
    assert torch.equal(again, chunks[0])  # seeded: the same clip generates the same frames
    # the same frames as one uninterrupted generation
    with torch.inference_mode():
        whole = generate(
            model.transformer, spec.sampler, prepared.reference_tokens,
            prepared.reference_latent, prepared.audio,
            torch.Generator().manual_seed(spec.sampler.seed),
        )  # fmt: skip
    assert torch.allclose(whole.latents[0], latents, atol=1e-6)


def test_cross_audio_generates_one_frame_per_audio_frame(trained):
    fam, spec, path, clips = trained
    model = fam.load_model(path, spec)
    prepared = fam.prepare_clip(spec, features(clips[0], hubert_from=clips[1]), None, 0)
    assert prepared.num_frames == 7
    with torch.inference_mode():
        out = fam.sample(model, prepared, torch.arange(7))
    own = fam.prepare_clip(spec, features(clips[0]), None, 0)
    with torch.inference_mode():
        mine = fam.sample(model, own, torch.arange(7))
    assert out.shape == (7, 4, 8, 8) and not torch.allclose(out, mine)


def test_clips_that_do_not_fit_the_checkpoint_are_refused(trained):
    fam, spec, _, clips = trained
    feats = features(clips[0])
    bad = {
        "vae_latents": feats["vae_latents"][:, :2],
        "hubert": feats["hubert"][..., :5],
        "reference": feats["reference"][:, :3],
    }
    for name, value in bad.items():
        with pytest.raises(ValueError):
            fam.prepare_clip(spec, {**feats, name: value}, None, 0)


def test_a_stage1_checkpoint_cannot_sample(tmp_path):
    clip = write_clip(tmp_path, "c", 6)
    fam = DualForceFamily(tiny_config("stage1"))
    spec = fam.make_spec(layout())
    with pytest.raises(ValueError, match="only the structure projector"):
        fam.prepare_clip(spec, features(clip), None, 0)
