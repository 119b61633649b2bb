"""DualForce on CUDA (skipped without one): bf16 stage-3 steps and cached generation.

The seed-size figures (step time, memory, frames/s) are ``benchmarks/bench_dualforce.py
--device cuda``; these check that the tiny model trains under bf16 autocast with gradient
checkpointing and that cached generation still equals the recomputed causal forward on the
GPU's kernels.
"""

from __future__ import annotations

import pytest
import torch

from generators.dualforce.config import SamplerConfig
from generators.dualforce.family import DualForceFamily
from generators.dualforce.sampler import generate
from tests.dualforce_helpers import (
    active_model,
    layout,
    random_inputs,
    tiny_arch,
    tiny_config,
    write_clip,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_stage3_trains_under_bf16_autocast_with_gradient_checkpointing(tmp_path):
    clips = [write_clip(tmp_path, f"c{i}", 20, seed=i) for i in range(2)]
    fam = DualForceFamily(tiny_config("stage3", clip_frames=8))
    spec = fam.make_spec(layout())
    data = fam.load_training_data(spec, clips, None)
    torch.manual_seed(0)
    model = fam.build(spec).cuda()
    model.enable_gradient_checkpointing()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(30):
        batch = {k: v.cuda() for k, v in fam.training_batch(data, 0, step % 2, 4, 0, 4).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            terms = fam.training_step(model, batch)
        terms["loss"].backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(terms["loss"].detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4])


def test_cached_generation_equals_the_recomputed_forward_on_cuda():
    arch = tiny_arch(window_frames=3)
    model = active_model(arch, open_gates=True).float().cuda()
    inp = random_inputs(arch, b=1, t=7)
    cfg = SamplerConfig(steps_per_frame=3, audio_guidance=1.5)
    out = []
    for use_cache in (True, False):
        with torch.inference_mode():
            result = generate(
                model, cfg, inp.reference_tokens.float().cuda(),
                inp.reference_latent.float().cuda(), inp.audio.float().cuda(),
                torch.Generator().manual_seed(0), use_cache=use_cache,
            )  # fmt: skip
        out.append(result.latents)
    assert (out[0] - out[1]).abs().max() < 1e-4
