"""The features stage's typed config: the extractors' models, dtypes, alignment and placement.

Apart from :mod:`tasks.features` so that validating a pipeline config imports no torch or
extractor.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.registry import ModelSpec
from tasks.base import Resources, StageConfig, stable_hash

VAE_FAMILIES = ("vae-flux1", "vae-sd", "vae-flux2")

# feature families computed from the clip's audio (cross-audio generation swaps exactly these)
AUDIO_FEATURES = frozenset({"hubert", "sensevoice", "whisper"})


class ExtractorPools(BaseModel):
    """Where each extractor runs and with what resources (see :mod:`tasks.pools`).

    ``placement: own_pools`` gives every extractor a Ray actor pool of its own with the
    CPUs, GPU fraction, pool size (``num_workers``) and batch size below; the stage's
    workers then only decode, dispatch and write. ``in_worker`` loads every model inside
    each stage worker (on the stage's device) and uses only the batch sizes below: on a
    CPU-only machine this avoids moving frames between processes (measured in
    ``benchmarks/bench_features.py``). Neither changes what is computed.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    placement: Literal["in_worker", "own_pools"] = "in_worker"
    vae_latents: Resources = Resources(batch_size=16)
    liveportrait_motion: Resources = Resources(batch_size=32)
    emoca_flame: Resources = Resources(batch_size=32)
    reference: Resources = Resources(batch_size=1)
    hubert: Resources = Resources(batch_size=4)
    sensevoice: Resources = Resources(batch_size=1)
    whisper: Resources = Resources(batch_size=1)


class FeaturesConfig(StageConfig):
    vae: ModelSpec = ModelSpec(family="vae-flux1", source="models/vae-flux1-tiny", tiny_random=True)
    hubert: ModelSpec = ModelSpec(family="hubert", source="models/hubert-tiny", tiny_random=True)
    hubert_layer: int = Field(-1, description="-1: model output; 0..L: hidden_states index")
    latent_dtype: Literal["float16", "float32"] = "float16"
    hubert_dtype: Literal["float16", "float32"] = "float16"
    max_misalignment_frames: int = Field(2, ge=0, description="allowed |audio - video| in frames")
    hubert_window_s: float = Field(20.0, gt=1.0, description="HuBERT window for long audio")
    hubert_context_s: float = Field(1.0, ge=0.0, description="extra audio each side of a window")
    motion: ModelSpec | None = ModelSpec(
        family="liveportrait-motion", source="models/liveportrait-motion-tiny", tiny_random=True
    )
    flame: ModelSpec | None = ModelSpec(
        family="emoca", source="models/emoca-tiny", tiny_random=True
    )
    sensevoice: ModelSpec | None = ModelSpec(
        family="sensevoice", source="models/sensevoice-tiny", tiny_random=True
    )
    reference: ModelSpec | None = ModelSpec(
        family="dinov2", source="models/dinov2-tiny", tiny_random=True
    )
    whisper: ModelSpec | None = Field(
        None, description="Whisper encoder (MuseTalk 1.5's audio input; e.g. openai/whisper-tiny)"
    )
    masked_latents: bool = Field(
        False,
        description="also store MuseTalk's half-masked latents, for the official musetalk15 "
        "baseline (vae_latents.safetensors tensor masked_latents)",
    )
    framing_window_frames: int = Field(
        9, ge=1, description="odd; moving average over the LivePortrait / EMOCA crop boxes"
    )
    amp_dtype: Literal["bfloat16", "float16", "none"] = Field(
        "bfloat16", description="autocast dtype on CUDA (mixed precision); CPU runs float32"
    )
    pools: ExtractorPools = ExtractorPools()
    max_inflight_chunks: int = Field(
        4, ge=1, description="decoded chunks awaiting the extractors (bounds memory)"
    )

    OPERATIONAL_FIELDS: ClassVar[tuple[str, ...]] = ("resources", "pools", "max_inflight_chunks")

    def params_hash(self) -> str:
        """Placement and resources change where features are computed, not what they are.
        ``masked_latents: false`` hashes as before the option existed (keys stay valid)."""
        exclude = set(self.OPERATIONAL_FIELDS) | (
            set() if self.masked_latents else {"masked_latents"}
        )
        return stable_hash(self.model_dump(mode="json", exclude=exclude))

    @field_validator("vae")
    @classmethod
    def _vae_family(cls, v: ModelSpec) -> ModelSpec:
        if v.family not in VAE_FAMILIES:
            raise ValueError(f"vae.family must be one of {VAE_FAMILIES}, got {v.family!r}")
        return v

    @field_validator("hubert")
    @classmethod
    def _hubert_family(cls, v: ModelSpec) -> ModelSpec:
        if v.family != "hubert":
            raise ValueError(f"hubert.family must be 'hubert', got {v.family!r}")
        return v

    @field_validator("framing_window_frames")
    @classmethod
    def _odd_window(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("framing_window_frames must be odd (centred window)")
        return v

    @field_validator("whisper")
    @classmethod
    def _whisper_family(cls, v: ModelSpec | None) -> ModelSpec | None:
        if v is not None and v.family != "whisper":
            raise ValueError(f"whisper.family must be 'whisper', got {v.family!r}")
        return v
