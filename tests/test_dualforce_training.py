"""DualForce training: noise sampling, losses, overfitting, LoRA, parents (notes tests 1, 7–9)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from generators.dualforce.config import NoiseConfig
from generators.dualforce.family import DualForceFamily
from generators.dualforce.lora import base_name, is_lora_param, lora_ranks, merge_lora
from generators.dualforce.model import DualForceTransformer
from generators.dualforce.objectives import (
    add_noise,
    lip_sync_loss,
    masked_mse,
    sample_sigmas,
    stage3_losses,
    velocity_target,
)
from generators.dualforce.sampler import generate
from generators.dualforce.structure import StructureProjector
from generators.io import read_tensor
from tests.dualforce_helpers import (
    layout,
    one_thread,  # noqa: F401 - autouse fixture
    random_inputs,
    tiny_config,
    write_clip,
)

NO_AUGMENT = {
    "p_temporal_crop": 0.0, "p_speed": 0.0, "p_color": 0.0, "p_flip": 0.0, "p_noise": 0.0,
    "p_random_reference": 0.0,
}  # fmt: skip


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("dualforce-clips")
    return [write_clip(folder, f"c{i}", 12 + 3 * i, seed=i) for i in range(3)]


def family(stage: str, **fields: object) -> DualForceFamily:
    return DualForceFamily(tiny_config(stage, **fields))


# ---------------------------------------------------------------------------- 1. noise


def test_sigmas_are_independent_per_clip_and_frame_and_structure_is_cleaner():
    sv, ss = sample_sigmas(400, 16, NoiseConfig(), torch.Generator().manual_seed(0))
    assert sv.shape == ss.shape == (400, 16)
    assert float(sv.min()) >= 0 and float(sv.max()) <= 1 and float(ss.max()) <= 0.7
    assert float(ss.max()) > 0.69 and float(sv.max()) > 0.99
    flat = torch.stack([sv.flatten(), ss.flatten(), sv[:, 1:].flatten().repeat(2)[: sv.numel()]])
    corr = torch.corrcoef(flat)
    assert corr[0, 1].abs() < 0.05  # σ_v and σ_s independent
    frame_corr = torch.corrcoef(torch.stack([sv[:, 0], sv[:, 1]]))[0, 1]
    assert frame_corr.abs() < 0.15  # frames of one clip independent
    assert (sv[:, 0] != sv[:, 1]).all() and (sv[0] != sv[1]).all()


def test_noised_tensor_is_the_formula_exactly_in_fp64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    sigma = torch.rand(2, 5, generator=g, dtype=torch.float64)
    noisy = add_noise(x, sigma, eps)
    for b in range(2):
        for t in range(5):
            s = sigma[b, t]
            assert torch.equal(noisy[b, t], (1 - s) * x[b, t] + s * eps[b, t])
    # the velocity target is d(noisy)/dσ: a finite difference along σ reproduces it
    h = 1e-6
    fd = (add_noise(x, sigma + h, eps) - noisy) / h
    assert torch.allclose(fd, velocity_target(x, eps), atol=1e-6)


def test_batches_carry_clean_audio_and_reference_and_per_frame_noise(clips):
    fam = family("stage3", augment=NO_AUGMENT, clip_frames=6)
    spec = fam.make_spec(layout())
    data = fam.load_training_data(spec, clips, None)
    batch = fam.training_batch(data, 7, 3, 4, 0, 4)
    assert batch["latents"].shape == (4, 6, 4, 8, 8) and batch["valid"].all()
    for row in range(4):
        hub, lat = batch["hubert"][row], batch["latents"][row]
        # audio is an untouched window of one clip's HuBERT, at the same frames as the latents
        hits = []
        for clip in clips:
            full = read_tensor(clip.paths["hubert"], "features")
            lats = read_tensor(clip.paths["vae_latents"], "latents").float()
            for s in range(full.shape[0] - 5):
                if torch.equal(full[s : s + 6], hub):
                    hits.append((clip.clip_id, s, torch.equal(lats[s : s + 6], lat)))
                    ref = read_tensor(clip.paths["reference"], "patch_tokens")
                    assert torch.equal(batch["reference_tokens"][row], ref)
                    assert torch.equal(batch["reference_latent"][row], lats[0])
        assert len(hits) == 1 and hits[0][2]
    assert float(batch["sigma_struct"].max()) <= 0.7
    assert len(set(batch["sigma_video"].flatten().tolist())) == 24  # per (row, frame)


def test_a_rows_draws_depend_on_seed_step_and_row_only(clips):
    fam = family("stage3", clip_frames=6)
    data = fam.load_training_data(fam.make_spec(layout()), clips, None)
    whole = fam.training_batch(data, 1, 5, 4, 0, 4)
    halves = [fam.training_batch(data, 1, 5, 4, r, r + 2) for r in (0, 2)]
    for key, value in whole.items():
        assert torch.equal(value, torch.cat([h[key] for h in halves])), key
    other = fam.training_batch(data, 1, 6, 4, 0, 4)
    assert not torch.equal(other["eps_video"], whole["eps_video"])


def test_short_windows_are_padded_and_masked(clips):
    fam = family("stage3", clip_frames=20, augment=NO_AUGMENT)
    data = fam.load_training_data(fam.make_spec(layout()), clips[:1], None)  # 12 frames
    batch = fam.training_batch(data, 0, 1, 2, 0, 2)
    assert batch["valid"].sum(1).tolist() == [12.0, 12.0]
    assert torch.all(batch["latents"][:, 12:] == 0)


# ---------------------------------------------------------------------------- 7. loss terms


def test_flow_matching_and_flame_terms_vanish_exactly_on_a_perfect_prediction():
    g = torch.Generator().manual_seed(2)
    x, eps = torch.randn(2, 4, 3, 4, 4, generator=g), torch.randn(2, 4, 3, 4, 4, generator=g)
    valid = torch.ones(2, 4)
    assert masked_mse(velocity_target(x, eps), eps - x, valid) == 0
    assert masked_mse(velocity_target(x, eps) + 0.1, eps - x, valid) > 0
    valid[1, 2:] = 0  # padded frames never count
    wrong_on_padding = (eps - x).clone()
    wrong_on_padding[1, 2:] += 100
    assert masked_mse(wrong_on_padding, eps - x, valid) == 0


def test_contrastive_lip_loss_prefers_aligned_audio_over_shifted_audio():
    g = torch.Generator().manual_seed(3)
    audio = torch.randn(2, 16, 8, generator=g)
    valid = torch.ones(2, 16)
    shifts = torch.tensor([[2, 5, 9], [3, 4, 10]])
    aligned = lip_sync_loss(audio, audio, shifts, valid, 0.07)
    shifted = lip_sync_loss(audio.roll(3, dims=1), audio, shifts, valid, 0.07)
    assert aligned < 0.05 < shifted
    assert lip_sync_loss(audio, audio, torch.full((2, 3), -1), valid, 0.07) == 0


def test_stage_losses_are_finite_and_weighted_as_configured(clips):
    weights = {"video": 1.0, "struct": 0.5, "flame": 0.1, "lip": 0.3}
    fam = family("stage3", clip_frames=8, losses=weights)
    spec = fam.make_spec(layout())
    model = fam.build(spec)
    batch = fam.training_batch(fam.load_training_data(spec, clips, None), 0, 1, 2, 0, 2)
    terms = fam.training_step(model, batch)
    total = sum(w * terms[k] for k, w in weights.items())
    assert torch.isfinite(terms["loss"]) and torch.allclose(terms["loss"], total)
    assert all(float(terms[k]) > 0 for k in weights)


# ---------------------------------------------------------------------------- 8. overfit


def test_a_tiny_model_overfits_one_clip_and_the_sampler_reproduces_it(tmp_path):
    clip = write_clip(tmp_path, "one", 6, seed=11)
    fields = {"clip_frames": 6, "augment": NO_AUGMENT, "losses": {"audio_dropout": 0.0}}
    fam = family("stage3", **fields)
    spec = fam.make_spec(layout())
    data = fam.load_training_data(spec, [clip], None)
    torch.manual_seed(0)
    net = DualForceTransformer(spec.arch)  # the whole network trains here (stages 2 + 3)
    projector = StructureProjector(spec.arch)
    weights = fam.config.losses
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.0)
    sampler = spec.sampler.model_copy(update={"steps_per_frame": 8})
    target = read_tensor(clip.paths["vae_latents"], "latents").float()
    tokens = read_tensor(clip.paths["reference"], "patch_tokens")[None]
    audio = read_tensor(clip.paths["hubert"], "features")[None]

    def sample_error() -> float:
        with torch.no_grad():
            out = generate(
                net, sampler, tokens, target[:1], audio, torch.Generator().manual_seed(0)
            )
        return float((out.latents[0] - target).pow(2).mean())

    def video_loss(seed: int) -> float:
        batches = [fam.training_batch(data, seed, s, 4, 0, 4) for s in range(3)]
        with torch.no_grad():
            return sum(float(stage3_losses(net, projector, b, weights)["video"]) for b in batches)

    before, first = sample_error(), video_loss(9)
    for step in range(1, 301):
        loss = stage3_losses(net, projector, fam.training_batch(data, 0, step, 4, 0, 4), weights)
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
    assert video_loss(9) < 0.3 * first
    after = sample_error()
    assert after < 0.25 * before and after < 0.25 * float(target.var())


# ---------------------------------------------------------------------------- 9. LoRA


def test_stage3_trains_only_lora_and_new_modules_and_merging_keeps_outputs(clips):
    fam = family("stage3", clip_frames=6)
    spec = fam.make_spec(layout())
    model = fam.build(spec)
    ranks = lora_ranks(model.transformer)
    per_block = {
        *(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
        "ffn.net.0.proj",
        "ffn.net.2",
    }
    want = {
        f"blocks.{i}.video.{name}": 2 if name.startswith("ffn") else 4
        for i in range(spec.arch.num_layers)
        for name in per_block
    }
    assert ranks == want  # attention rank / FFN rank from the config, video backbone only
    batch = fam.training_batch(fam.load_training_data(spec, clips, None), 0, 1, 2, 0, 2)
    fam.training_step(model, batch)["loss"].backward()
    backbone = {"patch_embed", "video_modality", "sigma_video", "video_head", "image_embedder",
                "reference_modality"}  # fmt: skip
    for name, p in model.named_parameters():
        part = name.split(".")
        frozen = part[0] == "projector" or part[1] in backbone or ".video." in name
        assert p.requires_grad == (is_lora_param(name) or not frozen), name
        assert (p.grad is not None) == p.requires_grad, name
    assert any(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)

    net = model.transformer.double()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)  # adapters away from their zero init
    inp = random_inputs(spec.arch, t=3)
    before = net(inp)
    merge_lora(net)
    after = net(inp)
    assert not lora_ranks(net) and not any(is_lora_param(n) for n, _ in net.named_parameters())
    for a, b in zip(
        (before.video_velocity, before.struct_velocity),
        (after.video_velocity, after.struct_velocity),
    ):
        assert torch.allclose(a, b, atol=1e-10)


# ---------------------------------------------------------------------------- stage chaining


def test_each_stage_starts_from_the_previous_ones_committed_weights(clips, tmp_path):
    specs, paths, models = {}, {}, {}
    for stage, parent in (("stage1", None), ("stage2", "stage1"), ("stage3", "stage2")):
        fam = family(stage, clip_frames=6)
        spec = specs[stage] = fam.make_spec(layout())
        model = models[stage] = fam.build(spec)
        data = fam.load_training_data(spec, clips, None)
        fam.prepare_model(model, spec, data)
        if parent is not None:
            fam.init_from_parent(model, spec, paths[parent], specs[parent].to_json())
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        fam.training_step(model, fam.training_batch(data, 0, 1, 2, 0, 2))["loss"].backward()
        opt.step()  # the weights now differ from any fresh build
        paths[stage] = tmp_path / f"{stage}.safetensors"
        fam.save_weights(paths[stage], model, spec)
    one, two, three = (models[s].state_dict() for s in ("stage1", "stage2", "stage3"))
    assert set(one) == {k for k in two if k.startswith("projector.")}
    assert all(torch.equal(one[k], two[k]) for k in one)  # stage 1's projector, statistics too
    assert float(one["projector.motion_std"].std()) > 0  # prepare_model set real statistics
    assert all(torch.equal(v, three[k]) for k, v in one.items())  # frozen in stages 2 and 3
    plain = {base_name(k): v for k, v in three.items() if not is_lora_param(k)}
    assert set(plain) == set(two)  # stage 3 = stage 2's weights + adapters
    moved = [k for k in two if not torch.equal(two[k], plain[k])]
    assert moved and all(".video." not in k for k in moved)  # backbone frozen in stage 3
    fam3 = family("stage3", clip_frames=6)
    loaded = fam3.load_model(paths["stage3"], specs["stage3"])  # adapters merged for sampling
    assert not lora_ranks(loaded)
    with pytest.raises(ValueError, match="stage3 starts from stage2"):
        fam3.init_from_parent(fam3.build(specs["stage3"]), specs["stage3"], paths["stage1"],
                              specs["stage1"].to_json())  # fmt: skip
    bad = tmp_path / "bad.safetensors"
    save_file({"projector.nope": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="do not fit"):
        family("stage2").init_from_parent(
            models["stage2"], specs["stage2"], bad, specs["stage1"].to_json()
        )


def test_gradient_checkpointing_gives_the_same_gradients(clips):
    fam = family("stage2", clip_frames=6)
    spec = fam.make_spec(layout())
    batch = fam.training_batch(fam.load_training_data(spec, clips, None), 0, 1, 2, 0, 2)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = fam.build(spec).double()
        if checkpointed:
            model.enable_gradient_checkpointing()
        double = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        fam.training_step(model, double)["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-12) for n in grads[0])


def test_stage1_projector_learns_to_reconstruct_motion_in_liveportrait_units(clips):
    fam = family("stage1", clip_frames=8, augment=NO_AUGMENT)
    spec = fam.make_spec(layout())
    data = fam.load_training_data(spec, clips, None)
    torch.manual_seed(0)
    model = fam.build(spec)
    fam.prepare_model(model, spec, data)
    motion = torch.cat([c.motion for c in data.clips])
    proj = model.projector

    def error() -> float:
        with torch.no_grad():
            return float((proj.decode(proj.encode(motion)) - motion).pow(2).mean())

    before = error()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(150):
        fam.training_step(model, fam.training_batch(data, 0, step, 4, 0, 4))["loss"].backward()
        opt.step()
        opt.zero_grad()
    assert error() < 0.3 * before
    latent = proj.encode(motion)  # the scale flow matching assumes: zero mean, unit variance
    assert latent.mean(-1).abs().max() < 1e-5 and torch.allclose(
        latent.std(-1), torch.ones(1), atol=0.1
    )
