"""Typed configuration of the ``musetalk2`` family: per-stage presets and the model spec.

:class:`Musetalk2Config` is what a user writes under ``train:`` (``family: musetalk2``).
``training_stage`` selects a preset (seed Phase 8 / 9.2) that fills every field the user
leaves out, so the resolved config (saved with the run) shows concrete values:

- ``stage1`` and the migration phases ``adapter_only`` / ``encoder_decoder`` /
  ``full_network``: single frames, mHC / Engram / Gated Attention / DSA off, losses
  ``l1_pixel 1 + pmf 0.1 + vgg 0.01``, no sync loss, no Dynamic Margin Sampling;
- ``stage2``: 16-frame samples, all four components on, sync loss 0.05, DMS on.

Which parameters each migration phase trains is the family's (:data:`PHASE_TRAINABLE`).
:class:`Musetalk2Spec` is everything needed to rebuild the network and feed it exactly as
in training; it is derived from the config and the training data's shapes.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from generators.blocks.config import EngramConfig, PMFConfig
from generators.family_config import FamilyConfig, ModelSpec
from models.registry import ModelSpec as RegistrySpec

FAMILY = "musetalk2"
Stage = Literal["stage1", "adapter_only", "encoder_decoder", "full_network", "stage2"]
AudioKind = Literal["sensevoice", "hubert"]

# Phase 9.2: regexes (re.fullmatch on named_parameters of the bare network) of what trains.
# adapter_only also trains what the weight transfer had to create or reshape.
PHASE_TRAINABLE: dict[str, tuple[str, ...]] = {
    "adapter_only": (
        r"adapter\..*",
        r"v_head\..*",
        r"unet\.conv_out\..*",
        r"unet\.class_embedding\..*",
        r".*\.attn2\.to_[kv]\..*",
    ),
    "encoder_decoder": (r"(?!unet\.mid_block\.).*",),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MHCOptions(_Strict):
    enabled: bool = False
    streams: int = Field(4, ge=1, le=8, description="n residual streams (TileKernels: 4)")
    sinkhorn_iters: int = Field(20, ge=1)


class EngramOptions(_Strict):
    """The Engram module and its keys.

    ``keys: kmeans`` (default): the engram stage's k-means code of each frame's HuBERT
    features; vocabulary, orders, heads, table size and seed must equal the engram stage's
    (``codebook_size``, ``ngram_orders``, ``num_heads``, ``table_size``, ``seed``): the
    tables are initialised from its memory bank (checked at start).
    ``keys: ctc``: the features stage's SenseVoice CTC argmax token of each frame
    (``sensevoice/ctc_tokens``); ``vocab_size`` must be the SenseVoice vocabulary (the
    file's ``ctc_vocab_size``: 25055 for SenseVoiceSmall; checked per clip). The memory
    bank is keyed by k-means codes, so with CTC keys it is not read: the tables start from
    their random init and the module keeps its own hashing."""

    enabled: bool = False
    keys: Literal["kmeans", "ctc"] = "kmeans"
    levels: list[str] | None = None  # default: the second down level and its mirror
    vocab_size: int = Field(16, ge=2)
    orders: list[int] = [2, 3]
    heads_per_order: int = Field(4, ge=1)
    table_size: int = Field(257, ge=2)
    head_dim: int = Field(16, ge=1)
    window: Literal["causal", "centred"] = "causal"
    conv_kernel: int = Field(4, ge=1)
    seed: int = 0


class GatedOptions(_Strict):
    enabled: bool = False
    mode: Literal["elementwise", "headwise"] = "elementwise"
    # σ(2) = 0.88: close to the ungated function a stage-2 network starts from, with a
    # usable gate gradient (σ'(2) = 0.10); 0 is the paper's from-scratch init
    init_bias: float = 2.0


class DSAOptions(_Strict):
    enabled: bool = False
    levels: list[str] | None = None  # default: the second-to-last down level, mid, its mirror
    heads: int = Field(4, ge=1)
    indexer_heads: int = Field(4, ge=1)
    indexer_dim: int = Field(32, ge=1)
    top_k: int = Field(512, ge=1)
    phase: Literal["dense", "sparse"] = "sparse"  # dense = indexer warm-up (KL on all keys)
    causal: bool = False


class LossWeights(_Strict):
    l1_latent: float = Field(0.0, ge=0)
    l1_pixel: float = Field(1.0, ge=0)  # through the frozen VAE decoder
    pmf: float = Field(0.1, ge=0)
    vgg: float = Field(0.01, ge=0)  # MuseTalk 1.5's VGG19 pyramid (perceptual: vgg19)
    lpips: float = Field(0.0, ge=0)  # LPIPS-VGG (perceptual: lpips)
    sync: float = Field(0.0, ge=0)
    indexer: float = Field(1.0, gt=0)  # DSA indexer KL (only with DSA on)
    pixel_max_t: float = Field(1.0, gt=0, le=1)  # pixel terms on rows with t ≤ this (pMF: 0.8)


class PerceptualOptions(_Strict):
    vgg_layer_weights: list[float] = [1.0, 1.0, 1.0, 1.0, 1.0]
    pyramid_scales: list[float] = [1.0, 0.5, 0.25, 0.125]
    input_size: int = Field(224, ge=32)


class DMSOptions(_Strict):
    """Dynamic Margin Sampling: the mask edge moves ``clip(N(mean, std), 0, max)`` pixels."""

    enabled: bool = False
    mean_px: float = 10.0
    std_px: float = Field(10.0, ge=0)
    max_px: float = Field(20.0, ge=0)


class SamplingOptions(_Strict):
    reference: Literal["ifs", "random"] = "ifs"
    top_k_ratio: float = Field(0.51, gt=0, le=1)
    min_gap_frames: int = Field(5, ge=0)
    dms: DMSOptions = DMSOptions()


_OFF = {"enabled": False}
PRESETS: dict[str, dict[str, Any]] = {
    "stage1": {
        "n_sample_frames": 1,
        "mhc": _OFF,
        "engram": _OFF,
        "gated_attention": _OFF,
        "dsa": _OFF,
        "losses": {"l1_pixel": 1.0, "pmf": 0.1, "vgg": 0.01, "sync": 0.0},
        "sampling": {"dms": _OFF},
    },
    "stage2": {
        "n_sample_frames": 16,
        "mhc": {"enabled": True},
        "engram": {"enabled": True},
        "gated_attention": {"enabled": True},
        "dsa": {"enabled": True},
        "losses": {"l1_pixel": 1.0, "pmf": 0.1, "vgg": 0.01, "sync": 0.05},
        "sampling": {"dms": {"enabled": True}},
    },
}
for _phase in ("adapter_only", "encoder_decoder", "full_network"):
    PRESETS[_phase] = PRESETS["stage1"]


def _merge(preset: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(preset)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class Musetalk2Config(FamilyConfig):
    family: Literal["musetalk2"] = FAMILY
    training_stage: Stage = "stage1"
    unet: Literal["tiny", "full"] = Field("tiny", description="tiny (CPU) or musetalk.json sizes")
    block_out_channels: list[int] | None = None  # overrides the preset's widths
    layers_per_block: int | None = Field(None, ge=1)
    adapter_out_channels: int = Field(8, ge=1, description="UNet in_channels (1.5 layout: 8)")
    adapter_init_gain: float = Field(0.01, ge=0, description="xavier gain (Phase 1.2)")
    audio: AudioKind = "sensevoice"
    audio_window: int = Field(2, ge=0, le=16, description="audio rows/frames each side")
    n_sample_frames: int = Field(1, ge=1, le=64)
    mhc: MHCOptions = MHCOptions()
    engram: EngramOptions = EngramOptions()
    gated_attention: GatedOptions = GatedOptions()
    dsa: DSAOptions = DSAOptions()
    losses: LossWeights = LossWeights()
    perceptual: Literal["vgg19", "lpips"] = "vgg19"
    perceptual_options: PerceptualOptions = PerceptualOptions()
    pmf: PMFConfig = PMFConfig()
    sampling: SamplingOptions = SamplingOptions()
    vgg19: RegistrySpec = RegistrySpec(family="vgg19", source="./models/vgg19")
    lpips: RegistrySpec = RegistrySpec(family="lpips-vgg", source="./models/lpips-vgg")
    syncnet: RegistrySpec = RegistrySpec(
        family="syncnet-latentsync", source="./models/syncnet-latentsync"
    )

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        stage = values.get("training_stage", "stage1")
        if stage not in PRESETS:
            return values  # the Literal reports it
        given = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in values.items()}
        return _merge(PRESETS[stage], given)

    @model_validator(mode="after")
    def _consistent(self) -> Musetalk2Config:
        if self.dsa.enabled and self.n_sample_frames < 2:
            raise ValueError(
                "dsa is temporal attention over a sample's frames: n_sample_frames ≥ 2"
            )
        if self.losses.sync > 0 and self.n_sample_frames < 2:
            raise ValueError("the sync loss scores a window of frames: n_sample_frames ≥ 2")
        return self

    def asset_specs(self) -> dict[str, RegistrySpec]:
        """The loss networks the weights switch on: VGG19 or LPIPS (``perceptual``), SyncNet."""
        w = self.losses
        specs = {}
        if w.vgg > 0 and self.perceptual == "vgg19":
            specs["vgg19"] = self.vgg19
        if w.lpips > 0 and self.perceptual == "lpips":
            specs["lpips"] = self.lpips
        if w.sync > 0:
            specs["syncnet"] = self.syncnet
        return specs


class Musetalk2Spec(ModelSpec):
    """Rebuilds the network and says how to feed it (stored as JSON with every checkpoint)."""

    family: Literal["musetalk2"] = FAMILY
    training_stage: Stage
    latent_channels: int
    latent_height: int
    latent_width: int
    latent_stride: int  # pixels per latent row (8; 16 for FLUX.2's patchified latents)
    audio: AudioKind
    audio_dim: int
    audio_steps: int  # audio tokens per window position (HuBERT: 2 per frame; SenseVoice: 1)
    audio_window: int
    unet_config: dict[str, Any]  # diffusers UNet2DConditionModel kwargs
    adapter_in_channels: int  # masked target, reference, z_t (latent_channels each) + mask
    adapter_init_gain: float
    n_sample_frames: int
    levels: list[str]
    mhc: MHCOptions
    engram: EngramOptions
    gated_attention: GatedOptions
    dsa: DSAOptions
    sampling: SamplingOptions

    @property
    def audio_tokens(self) -> int:
        return (2 * self.audio_window + 1) * self.audio_steps


def engram_config(spec: Musetalk2Spec) -> EngramConfig:
    """The Engram module's config (the spec's options less placement and key choice)."""
    return EngramConfig(**spec.engram.model_dump(exclude={"enabled", "levels", "keys"}))


def level_names(num_levels: int) -> list[str]:
    return [f"down{i}" for i in range(num_levels)] + ["mid"] + [f"up{i}" for i in range(num_levels)]


def unet_config(cfg: Musetalk2Config, channels: int, height: int, audio_dim: int) -> dict:
    """diffusers kwargs: the MuseTalk 1.5 layout (full) or its small CPU sibling (tiny)."""
    if cfg.unet == "full":
        widths, layers = [320, 640, 1280, 1280], 2
        extra: dict[str, Any] = {}
    else:
        widths, layers = [16, 32, 32], 1
        extra = {"norm_num_groups": 8}
    widths = cfg.block_out_channels or widths
    n = len(widths)
    return {
        "sample_size": height,
        "in_channels": cfg.adapter_out_channels,
        "out_channels": channels,
        "down_block_types": ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        "block_out_channels": widths,
        "layers_per_block": cfg.layers_per_block or layers,
        "attention_head_dim": 8,
        "cross_attention_dim": audio_dim,
        "class_embed_type": "timestep",  # the (t - r) embedding, added to the t embedding
        **extra,
    }


def make_spec(cfg: Musetalk2Config, shapes: dict[str, list[int]]) -> Musetalk2Spec:
    """The spec for data whose per-frame shapes are ``shapes`` (``DataLayout.shapes``)."""
    lat = shapes.get("vae_latents")
    if lat is None or len(lat) != 3:
        raise ValueError(f"musetalk2 needs vae_latents (C, h, w), got {lat}")
    channels, height, width = lat
    audio = shapes.get(cfg.audio)
    if cfg.audio == "hubert":
        if audio is None or len(audio) != 2:
            raise ValueError(f"musetalk2 needs hubert (steps, D) per frame, got {audio}")
        steps, audio_dim = audio
    else:
        if audio is None or len(audio) != 1:
            raise ValueError(f"musetalk2 needs sensevoice rows (D,), got {audio}")
        steps, audio_dim = 1, audio[0]
    ucfg = unet_config(cfg, channels, height, audio_dim)
    n = len(ucfg["block_out_channels"])
    if height % 2 ** (n - 1) or width % 2 ** (n - 1):
        raise ValueError(f"latents {height}x{width} do not halve {n - 1} times")
    levels = level_names(n)
    engram = cfg.engram.model_copy(
        update={
            "levels": cfg.engram.levels or [f"down{min(1, n - 1)}", f"up{n - 1 - min(1, n - 1)}"]
        }
    )
    dsa = cfg.dsa.model_copy(
        update={"levels": cfg.dsa.levels or [f"down{max(0, n - 2)}", "mid", f"up{min(1, n - 1)}"]}
    )
    for what, chosen in (("engram", engram.levels), ("dsa", dsa.levels)):
        unknown = sorted(set(chosen or []) - set(levels))
        if unknown:
            raise ValueError(f"{what} levels {unknown} are not among {levels}")
    if dsa.enabled:
        for w in ucfg["block_out_channels"]:
            if w % dsa.heads:
                raise ValueError(f"dsa.heads {dsa.heads} does not divide width {w}")
    return Musetalk2Spec(
        training_stage=cfg.training_stage,
        latent_channels=channels,
        latent_height=height,
        latent_width=width,
        latent_stride=16 if channels == 128 else 8,
        audio=cfg.audio,
        audio_dim=audio_dim,
        audio_steps=steps,
        audio_window=cfg.audio_window,
        unet_config=ucfg,
        adapter_in_channels=3 * channels + 1,
        adapter_init_gain=cfg.adapter_init_gain,
        n_sample_frames=cfg.n_sample_frames,
        levels=levels,
        mhc=cfg.mhc,
        engram=engram,
        gated_attention=cfg.gated_attention,
        dsa=dsa,
        sampling=cfg.sampling,
    )
