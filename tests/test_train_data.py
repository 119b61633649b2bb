"""Training data and model plumbing: sampling, conditioning layout, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from generators.musetalk15.data import MIN_REF_GAP_FRAMES, reference_frame, step_picks
from generators.musetalk15.model import (
    audio_window_tokens,
    build_unet_from_spec,
    make_spec,
    predict_latents,
    sinusoidal_positions,
    unet_input,
)
from tasks.train_checkpoint import load_checkpoint, read_checkpoint_meta, save_checkpoint


def build_unet(latent_channels: int, audio_dim: int, sample_size: int):
    return build_unet_from_spec(make_spec(latent_channels, audio_dim, sample_size, tiny=True))


def test_step_picks_are_a_pure_function_of_seed_and_step():
    counts = [30, 12, 50]
    a = step_picks(counts, seed=3, step=7, global_batch=8)
    assert a == step_picks(counts, seed=3, step=7, global_batch=8)
    assert a != step_picks(counts, seed=3, step=8, global_batch=8)
    for clip, t, r in a:
        assert 0 <= t < counts[clip] and 0 <= r < counts[clip]
        assert abs(r - t) > MIN_REF_GAP_FRAMES


def test_reference_frame_keeps_its_distance_and_covers_both_sides():
    seen = {reference_frame(10, 30, u / 100) for u in range(100)}
    assert all(abs(r - 10) > MIN_REF_GAP_FRAMES for r in seen)
    assert min(seen) == 0 and max(seen) == 29
    assert reference_frame(1, 4, 0.5) == 3  # too short a clip: the farther end


def test_unet_input_masks_lower_half_and_places_prior_there():
    target = torch.ones(2, 16, 8, 6)
    ref = torch.full((2, 16, 8, 6), 2.0)
    prior = torch.full((2, 16, 4, 6), 3.0)
    x = unet_input(target, ref, prior)
    assert x.shape == (2, 48, 8, 6)
    assert torch.all(x[:, :16, :4] == 1) and torch.all(x[:, :16, 4:] == 0)
    assert torch.all(x[:, 16:32] == 2)
    assert torch.all(x[:, 32:, :4] == 0) and torch.all(x[:, 32:, 4:] == 3)
    with pytest.raises(ValueError):
        unet_input(target, ref, torch.zeros(2, 16, 3, 6))


def test_audio_window_is_centred_zero_padded_and_position_encoded():
    feats = torch.arange(1, 6, dtype=torch.float32)[:, None, None].expand(5, 2, 4)  # (T=5,S,D)
    tok = audio_window_tokens(feats, torch.tensor([0, 2, 4]), window_frames=1)
    assert tok.shape == (3, 6, 4)
    raw = tok - sinusoidal_positions(6, 4)[None]
    assert raw[0, :, 0].tolist() == pytest.approx([0, 0, 1, 1, 2, 2])  # frame -1 is padding
    assert raw[1, :, 0].tolist() == pytest.approx([2, 2, 3, 3, 4, 4])
    assert raw[2, :, 0].tolist() == pytest.approx([4, 4, 5, 5, 0, 0])


def test_tiny_unet_forward_shapes():
    unet = build_unet(16, 32, 16)
    x = torch.randn(2, 48, 16, 16)
    tokens = audio_window_tokens(torch.randn(10, 2, 32), torch.tensor([0, 9]), 2)
    assert predict_latents(unet, x, tokens).shape == (2, 16, 16, 16)


def test_checkpoint_round_trip_restores_model_optimizer_and_scheduler(tmp_path):
    """The checkpoint directory (safetensors + JSON, no pickle) brings back model, the
    name-keyed optimizer state and the LR scheduler: one more step on the original and on
    the restored copy gives identical weights."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    spec = make_spec(16, 32, 8, tiny=True)
    opts = StateDictOptions(full_state_dict=True)

    def fresh(lr: float):
        torch.manual_seed(0)
        model = build_unet(16, 32, 8)
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return model, opt, sched

    model, opt, sched = fresh(1e-3)
    x, tok = torch.randn(2, 48, 8, 8), torch.randn(2, 10, 32)
    for _ in range(2):
        predict_latents(model, x, tok).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    model_state, optim_state = get_state_dict(model, opt, options=opts)
    save_checkpoint(
        tmp_path,
        step=2,
        fingerprint="fp",
        world_size=1,
        model_state=model_state,
        optimizer_state=optim_state,
        scheduler_state=sched.state_dict(),
        sampler={"seed": 0, "next_micro_step": 3, "global_batch": 2},
        spec=spec,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]

    state = load_checkpoint(tmp_path)
    assert (state.step, state.fingerprint, state.world_size) == (2, "fp", 1)
    assert state.sampler["next_micro_step"] == 3
    assert read_checkpoint_meta(tmp_path)["family"] == "musetalk15"
    model2, opt2, sched2 = fresh(5.0)
    set_state_dict(
        model2, opt2, model_state_dict=state.model, optim_state_dict=state.optimizer, options=opts
    )
    sched2.load_state_dict(state.scheduler)
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 / 3)
    for m, o, sc in ((model, opt, sched), (model2, opt2, sched2)):
        predict_latents(m, x, tok).pow(2).mean().backward()
        o.step()
        sc.step()
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
