"""DualForce network invariants (notes/dualforce.md tests 2–6) on tiny float64 models."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from generators.dualforce.blocks import DualForceBlock, StreamState
from generators.dualforce.config import SamplerConfig
from generators.dualforce.model import DualForceInputs, DualForceTransformer
from generators.dualforce.sampler import GenerationSession
from tests.dualforce_helpers import (
    active_model,
    one_thread,  # noqa: F401 - autouse fixture
    random_inputs,
    tiny_arch,
)

ARCH = tiny_arch()  # 3 blocks: 0, 1 shallow (fusion), 2 deep


def frames(inp: DualForceInputs, sl: slice) -> DualForceInputs:
    def cut(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[:, sl]

    return replace(
        inp,
        video=cut(inp.video),
        sigma_video=cut(inp.sigma_video),
        structure=cut(inp.structure),
        sigma_struct=cut(inp.sigma_struct),
        audio=cut(inp.audio),
    )


def block_outputs(model: DualForceTransformer, inp: DualForceInputs) -> list[torch.Tensor]:
    """Every block's video and structure output (hooks), then the three heads."""
    seen: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda m, a, out: seen.extend(out)) for b in model.blocks]
    out = model(inp)
    for h in hooks:
        h.remove()
    return [*seen, out.video_velocity, out.struct_velocity, out.flame]


# ---------------------------------------------------------------------------- 2. causality


@pytest.mark.parametrize("field", ["video", "sigma_video", "structure", "sigma_struct", "audio"])
def test_perturbing_frame_t_plus_1_leaves_every_output_up_to_t_unchanged(field):
    model = active_model(ARCH, open_gates=True)
    inp = random_inputs(ARCH, t=7)
    t = 3
    base = block_outputs(model, inp)
    x = getattr(inp, field).clone()
    bump = torch.rand_like(x[:, t + 1]) * 0.3 + 0.1  # not a constant: LayerNorms remove those
    x[:, t + 1] = x[:, t + 1] + (bump if field.startswith("sigma") else 5 * torch.randn_like(bump))
    moved = block_outputs(model, replace(inp, **{field: x}))
    assert len(base) == 2 * ARCH.num_layers + 3  # shallow and deep blocks, every head
    for a, b in zip(base, moved, strict=True):
        assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-12, rtol=0)
    changed = [not torch.allclose(a[:, t + 1 :], b[:, t + 1 :]) for a, b in zip(base, moved)]
    assert changed[-3] or changed[-2]  # the perturbation does reach later frames


def test_window_hides_frames_older_than_window_frames():
    arch = tiny_arch(window_frames=2)
    model = active_model(arch, open_gates=True)
    inp = random_inputs(arch, b=1, t=8)
    base = model(inp).video_velocity
    video = inp.video.clone()
    video[:, 0] += 5.0
    moved = model(replace(inp, video=video)).video_velocity
    # each block carries frame 0's change one window further: frames 0..L·(w−1) see it
    reach = arch.num_layers * (arch.window_frames - 1)
    assert not torch.allclose(base[:, reach], moved[:, reach])
    assert torch.allclose(base[:, reach + 1 :], moved[:, reach + 1 :], atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------- 3. mask pattern


def run_block(block: DualForceBlock, tokens_v, tokens_s, audio, ref_v, ref_s):
    b, t = tokens_v.shape[:2]
    cos_v = torch.ones(t * tokens_v.shape[2], ARCH.attention_head_dim, dtype=torch.float64)
    cos_s = torch.ones(t * tokens_s.shape[2], ARCH.struct_head_dim, dtype=torch.float64)
    mod_v = torch.full((b, t, 6, ARCH.dim), 0.1, dtype=torch.float64)
    mod_s = torch.full((b, t, 6, ARCH.struct_dim), 0.1, dtype=torch.float64)
    video = StreamState(tokens_v, mod_v, (cos_v, 0 * cos_v), None, ref_v)
    struct = StreamState(tokens_s, mod_s, (cos_s, 0 * cos_s), None, ref_s)
    return block(video, struct, audio)


@pytest.mark.parametrize("shallow", [True, False])
def test_within_frame_fusion_only_in_shallow_blocks(shallow):
    model = active_model(ARCH, open_gates=True)
    block = model.blocks[0 if shallow else ARCH.num_layers - 1]
    assert (block.fusion is not None) == shallow
    g = torch.Generator().manual_seed(3)
    b, t = 2, 1  # one frame: within-frame attention only

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    v = r(b, t, ARCH.tokens_per_frame, ARCH.dim)
    s = r(b, t, ARCH.struct_tokens_per_frame, ARCH.struct_dim)
    audio = r(b, t, ARCH.audio_tokens_per_frame, ARCH.audio_token_dim)
    ref_v, ref_s = r(b, 5, ARCH.dim), r(b, 5, ARCH.struct_dim)
    kept = (audio.clone(), ref_v.clone(), ref_s.clone())
    v0, s0 = run_block(block, v, s, audio, ref_v, ref_s)
    v1, _ = run_block(block, v, s + r(*s.shape), audio, ref_v, ref_s)  # structure changes
    _, s2 = run_block(block, v + r(*v.shape), s, audio, ref_v, ref_s)  # video changes
    v3, s3 = run_block(block, v, s, audio + r(*audio.shape), ref_v, ref_s)  # audio changes
    assert torch.equal(v0, v1) != shallow  # structure → video only in shallow blocks
    assert torch.equal(s0, s2) != shallow  # video → structure only in shallow blocks
    assert torch.equal(v0, v3) != shallow and torch.equal(s0, s3) != shallow  # audio → both
    assert all(torch.equal(a, b) for a, b in zip(kept, (audio, ref_v, ref_s)))  # never updated


def test_audio_and_reference_reach_every_block_unchanged():
    """Audio and reference tokens are inputs of every block, never updated by one."""
    model = active_model(ARCH, open_gates=True)
    inp = random_inputs(ARCH, t=4)
    seen = []
    hooks = [
        blk.register_forward_pre_hook(lambda m, args: seen.append((args[2], args[0].reference)))
        for blk in model.blocks
    ]
    model(inp)
    video = inp.video.clone()
    video[:, 1] += 3.0
    model(replace(inp, video=video))
    for h in hooks:
        h.remove()
    first = seen[0]
    for audio, ref in seen[1:]:
        assert torch.equal(audio, first[0]) and torch.equal(ref, first[1])


# ---------------------------------------------------------------------------- 4. zero-init identity


def test_fresh_gates_make_video_independent_of_structure_and_audio():
    model = active_model(ARCH, open_gates=False)  # every weight random except the gates
    inp = random_inputs(ARCH, t=5)
    alone = model(replace(inp, structure=None, sigma_struct=None, audio=None))
    full = model(inp)
    other = model(replace(inp, structure=inp.structure + 2.0, audio=inp.audio * -3.0))
    assert torch.equal(alone.video_velocity, full.video_velocity)
    assert torch.equal(full.video_velocity, other.video_velocity)
    video = model(replace(inp, video=inp.video * 2 + 1, sigma_video=inp.sigma_video / 2))
    assert torch.equal(video.struct_velocity, full.struct_velocity)
    assert torch.equal(video.flame, full.flame)
    opened = active_model(ARCH, open_gates=True)
    a, b = opened(inp), opened(replace(inp, structure=inp.structure + 2.0))
    assert not torch.allclose(a.video_velocity, b.video_velocity)  # the test can fail


def test_a_fresh_model_starts_with_closed_gates_and_zero_adaln_gates():
    model = DualForceTransformer(ARCH)
    gates = [p for n, p in model.named_parameters() if n.endswith(".g")]
    assert len(gates) == 4 * ARCH.fusion_depth and all(torch.all(g == 0) for g in gates)
    for blk in model.blocks:
        for stream in (blk.video, blk.struct):
            assert torch.all(stream.scale_shift_table[:, :, (2, 5)] == 0)
    for emb in (model.sigma_video, model.sigma_struct):
        assert torch.all(emb.time_proj.weight == 0) and torch.all(emb.time_proj.bias == 0)


# ---------------------------------------------------------------------------- 5. KV cache


def test_cached_steps_equal_the_full_causal_forward():
    model = active_model(ARCH, open_gates=True)
    t = ARCH.window_frames + 4  # the ring buffer wraps
    inp = random_inputs(ARCH, t=t)
    full = model(inp)
    cache = model.new_cache()
    steps = [model.step(frames(inp, slice(i, i + 1)), cache, commit=True) for i in range(t)]
    for name in ("video_velocity", "struct_velocity", "flame"):
        got = torch.cat([getattr(o, name) for o in steps], 1)
        assert (got - getattr(full, name)).abs().max() < 1e-10


def test_cached_generation_equals_recomputing_the_causal_forward_in_fp32():
    arch = tiny_arch(window_frames=3)
    model = active_model(arch, open_gates=True).float()
    inp = random_inputs(arch, b=1, t=arch.window_frames + 3)
    cfg = SamplerConfig(steps_per_frame=2, audio_guidance=2.0)
    out = {}
    for use_cache in (True, False):
        session = GenerationSession(
            model, cfg, inp.reference_tokens.float(), inp.reference_latent.float(),
            inp.audio.float(), torch.Generator().manual_seed(5), use_cache=use_cache,
        )  # fmt: skip
        out[use_cache] = torch.stack(
            [session.next_frame().video for _ in range(inp.video.shape[1])]
        )
    assert (out[True] - out[False]).abs().max() <= 1e-5
    assert out[True].abs().max() > 0.1


def test_cache_memory_stops_growing_after_the_window():
    arch = tiny_arch(window_frames=3)
    model = active_model(arch, open_gates=True).float()
    inp = random_inputs(arch, b=1, t=3 * arch.window_frames)
    session = GenerationSession(
        model, SamplerConfig(steps_per_frame=1), inp.reference_tokens.float(),
        inp.reference_latent.float(), inp.audio.float(), torch.Generator().manual_seed(0),
    )  # fmt: skip
    sizes, filled = [], []
    for _ in range(inp.video.shape[1]):
        session.next_frame()
        sizes.append(sum(session.cache.nbytes().values()))
        filled.append(session.cache.video[-1].filled)
    w = arch.window_frames
    assert len(set(sizes)) == 1 and sizes[0] > 0  # preallocated once, never grows
    assert filled == [min(i + 1, w - 1) for i in range(len(filled))]


# ---------------------------------------------------------------------------- 6. dual AdaLN


def modulations(model: DualForceTransformer, inp: DualForceInputs) -> tuple[list, list]:
    video, struct = [], []

    def grab(m, args):
        video.append(args[0].modulation)
        struct.append(args[1].modulation)

    hooks = [b.register_forward_pre_hook(grab) for b in model.blocks]
    model(inp)
    for h in hooks:
        h.remove()
    return video, struct


def test_sigma_video_modulates_only_video_and_sigma_struct_only_structure():
    model = active_model(ARCH, open_gates=True)
    inp = random_inputs(ARCH, t=4)
    v0, s0 = modulations(model, inp)
    v1, s1 = modulations(model, replace(inp, sigma_video=1 - inp.sigma_video))
    v2, s2 = modulations(model, replace(inp, sigma_struct=0.7 - inp.sigma_struct))
    assert all(torch.equal(a, b) for a, b in zip(s0, s1))  # σ_v leaves structure alone
    assert not any(torch.allclose(a, b) for a, b in zip(v0, v1))
    assert all(torch.equal(a, b) for a, b in zip(v0, v2))  # σ_s leaves video alone
    assert not any(torch.allclose(a, b) for a, b in zip(s0, s2))
    closed = active_model(ARCH, open_gates=False)
    a = closed(inp)
    b = closed(replace(inp, sigma_struct=0.7 - inp.sigma_struct))
    assert torch.equal(a.video_velocity, b.video_velocity)
    assert not torch.allclose(a.struct_velocity, b.struct_velocity)
