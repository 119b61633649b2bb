"""A tiny MuseTalk 2.0 learns one short clip: the pMF loss falls and one-step samples beat
what an untrained network (or any audio-blind predictor) can reach."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from generators.musetalk2.config import Musetalk2Config
from generators.musetalk2.family import Musetalk2Family
from tests.musetalk2_helpers import H, clip_features, layout

STEPS = 300


def _lower(x: torch.Tensor) -> torch.Tensor:
    return x[:, :, H // 2 :]


@pytest.fixture
def one_thread():
    """Tiny networks are dispatch-bound: one intra-op thread is faster and steadier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_few_hundred_cpu_steps_fit_one_clip_and_the_one_step_sample_improves(
    tmp_path, one_thread
):
    clip = clip_features(tmp_path, "clip", 24, seed=0)
    fam = Musetalk2Family(
        Musetalk2Config(
            audio="hubert",
            block_out_channels=[16, 32],
            losses={"l1_pixel": 0.0, "vgg": 0.0, "l1_latent": 1.0, "pmf": 1.0},
            sampling={"reference": "random"},
        )
    )
    spec = fam.make_spec(layout("hubert"))
    torch.manual_seed(0)
    model = fam.build(spec)
    data = fam.load_training_data(spec, [clip], None)
    feats = {k: load_file(clip.paths[k])[n] for k, n in fam.features_for(spec).items()}
    prepared = fam.prepare_clip(spec, feats, None, 0)
    frames = torch.arange(24)
    truth = _lower(feats["vae_latents"].float())

    def sample_error() -> float:
        with torch.no_grad():
            return float(((_lower(fam.sample(model.eval(), prepared, frames)) - truth) ** 2).mean())

    untrained = sample_error()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    raw = []
    model.train()
    for step in range(1, STEPS + 1):
        out = fam.training_step(model, fam.training_batch(data, 0, step, 8, 0, 8))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        raw.append(float(out["pmf_raw_u"]))
    start, end = sum(raw[:20]) / 20, sum(raw[-20:]) / 20
    trained = sample_error()
    print(f"pmf raw {start:.1f} -> {end:.2f}; sample mse {untrained:.3f} -> {trained:.4f}")
    assert end < 0.2 * start, (start, end)
    # the best audio-blind guess of the mouth rows is their mean over the clip; the audio
    # says how open the mouth is, so only a network that uses it gets below that
    blind = float(((truth - truth.mean(0, keepdim=True)) ** 2).mean())
    assert trained < 0.5 * blind < untrained, (trained, blind, untrained)
