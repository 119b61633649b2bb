"""Shared builders for the DualForce tests: tiny specs and models, inputs, feature files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from generators.dualforce.config import DualForceArch, DualForceConfig, DualForceSpec
from generators.dualforce.family import DualForceFamily
from generators.dualforce.model import DualForceInputs, DualForceTransformer
from generators.family_config import DataLayout, FeatureClip

LATENT = (4, 8, 8)  # C, h, w of the test latents
AUDIO_DIM = 16
REF_TOKENS, REF_DIM = 16, 12  # a 4x4 DINOv2 grid


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run on one intra-op thread: thread hand-offs cost more than the ops (and
    far more on a loaded machine); use with ``from tests.dualforce_helpers import one_thread``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def layout() -> DataLayout:
    return DataLayout(
        shapes={
            "vae_latents": list(LATENT),
            "hubert": [2, AUDIO_DIM],
            "liveportrait_motion": [133],
            "emoca_flame": [159],
            "reference": [REF_TOKENS, REF_DIM],
        }
    )


def tiny_config(stage: str = "stage3", **fields: object) -> DualForceConfig:
    base: dict[str, object] = {"training_stage": stage, "clip_frames": 8}
    base["augment"] = {"p_noise": 0.0}  # these clips have no wav (audio_noise has its own test)
    base["lora"] = {"attention_rank": 4, "ffn_rank": 2}
    base["sampler"] = {"steps_per_frame": 3}
    base.update(fields)
    return DualForceConfig(**base)


def tiny_spec(stage: str = "stage3", **fields: object) -> DualForceSpec:
    return DualForceFamily(tiny_config(stage, **fields)).make_spec(layout())


def tiny_arch(**overrides: object) -> DualForceArch:
    arch = tiny_spec().arch
    return arch.model_copy(update=overrides) if overrides else arch


def active_model(
    arch: DualForceArch | None = None, open_gates: bool = False, seed: int = 0
) -> DualForceTransformer:
    """A tiny model whose zero-initialised parameters (AdaLN-Zero projections and gates, the
    fusion gates when ``open_gates``) are set to random values, as after training, so every
    path of the network carries signal. ``float64`` for exactness."""
    torch.manual_seed(seed)
    model = DualForceTransformer(arch or tiny_arch()).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".g") and not open_gates:
                continue
            zeros = p == 0
            if zeros.any():
                p[zeros] = torch.randn(int(zeros.sum()), generator=g, dtype=p.dtype) * 0.3
    return model


def random_inputs(arch: DualForceArch, b: int = 2, t: int = 6, seed: int = 0) -> DualForceInputs:
    """Random inputs of the feature contract, float64, with per-frame σ."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    c, h, w = arch.in_channels, arch.latent_height, arch.latent_width
    return DualForceInputs(
        video=r(b, t, c, h, w),
        sigma_video=torch.rand(b, t, generator=g, dtype=torch.float64),
        reference_tokens=r(b, REF_TOKENS, arch.image_dim),
        reference_latent=r(b, c, h, w),
        structure=r(b, t, arch.struct_latent_dim),
        sigma_struct=torch.rand(b, t, generator=g, dtype=torch.float64) * 0.7,
        audio=r(b, t, arch.audio_steps_per_frame, arch.audio_dim),
    )


def write_clip(
    folder: Path, clip_id: str, num_frames: int, seed: int = 0, weight: float = 1.0
) -> FeatureClip:
    """A clip's five feature files in the features stage's layout (random, smooth in time)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def walk(*shape: int) -> torch.Tensor:
        steps = torch.randn(num_frames, *shape, generator=g) * 0.3
        return steps.cumsum(0) + torch.randn(1, *shape, generator=g)

    tensors = {
        "vae_latents": ("latents", walk(*LATENT).to(torch.float16)),
        "hubert": ("features", torch.randn(num_frames, 2, AUDIO_DIM, generator=g)),
        "liveportrait_motion": ("motion", walk(133) * 5),
        "emoca_flame": ("flame", walk(159)),
        "reference": ("patch_tokens", torch.randn(REF_TOKENS, REF_DIM, generator=g)),
    }
    paths = {}
    for family, (name, tensor) in tensors.items():
        path = folder / f"{clip_id}-{family}.safetensors"
        save_file({name: tensor.contiguous()}, str(path))
        paths[family] = str(path)
    return FeatureClip(clip_id=clip_id, num_frames=num_frames, paths=paths, sampling_weight=weight)
