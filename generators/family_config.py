"""The torch-free half of the family contract: config and spec bases, and the plain values.

A family's config and spec classes (its ``config.py``) derive from these and import
nothing heavy, so the train stage's config union (:func:`generators.registry.config_union`)
validates a pipeline config, and the stages plan (``model_specs``) and describe their
data, without importing torch or any family's network code. The plain values that cross
the stage ↔ family boundary (:class:`FeatureClip`, :class:`DataLayout`,
:class:`TrainingAssets`) live here for the same reason. The rest of the contract,
:class:`generators.family.ModelFamily`, lives in :mod:`generators.family`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from models.registry import ModelSpec as RegistrySpec


class FamilyConfig(BaseModel):
    """Base of a family's config; subclasses narrow ``family`` to ``Literal["<name>"]``."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    family: str
    training_stage: str = "main"  # families with stages narrow it to a Literal

    def asset_specs(self) -> dict[str, RegistrySpec]:
        """Frozen models the family's losses need under this config (name -> model-registry
        spec; default: none). The train stage fingerprints them into its key when it plans
        and resolves them to local paths (:class:`TrainingAssets`) when it runs."""
        return {}


class ModelSpec(BaseModel):
    """Base of a family's model spec (rebuilds the network; stored as JSON, never pickled)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str

    def to_json(self) -> str:
        return self.model_dump_json()


class FeatureClip(BaseModel):
    """One clip's feature files as local paths, keyed by feature family."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip_id: str
    num_frames: int
    paths: dict[str, str]  # feature family -> local safetensors path
    sampling_weight: float = Field(1.0, ge=0)  # the quality verdict's soft-rule weight
    audio_path: str | None = None  # the 16 kHz wav the audio features were computed from


class TrainingAssets(BaseModel):
    """Frozen models a family's losses need, as local paths (filled by the train stage).

    ``vae`` is the folder of the VAE that made the training latents (its decoder turns
    predictions into pixels); ``models`` maps each name of ``FamilyConfig.asset_specs()``
    to the local path the model registry resolved for it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    vae: str | None = None
    models: dict[str, str] = {}


class DataLayout(BaseModel):
    """Per-frame shapes of each required feature (the file's shape without its ``T``;
    the full shape for ``clip_features``, without the row axis for ``row_features``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shapes: dict[str, list[int]]
