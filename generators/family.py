"""The contract between the stages and a model family.

A family is three classes: its config (:class:`FamilyConfig` subclass, the user-facing
knobs), its spec (:class:`ModelSpec` subclass, everything needed to rebuild the network,
derived from the config and the training data's shapes, stored as JSON with every
checkpoint) and a :class:`ModelFamily` subclass with the methods below. The stages call
nothing else.

Data crosses the boundary as plain values: :class:`FeatureClip` (a clip's feature files
as local safetensors paths, keyed by feature family: ``vae_latents``, ``hubert``,
``sensevoice``, ...), :class:`DataLayout` (per-frame shapes common to all training clips),
tensors read from those files, and the memory bank as a dict of tensors
(:func:`generators.blocks.engram_hash.read_bank`).

Training contract: ``training_batch(data, seed, step, global_batch, start, stop)`` returns
rows ``start:stop`` of the global batch of ``step``, drawn from ``(seed, step)`` alone, so
ranks take disjoint slices of one batch and a resumed run sees the batches an
uninterrupted run would (no data-loader state in checkpoints). ``training_step`` returns
named scalar tensors; ``"loss"`` is what the optimiser minimises, the others are logged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file

from generators.io import read_metadata


class FamilyConfig(BaseModel):
    """Base of a family's config; subclasses narrow ``family`` to ``Literal["<name>"]``."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    family: str


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


class DataLayout(BaseModel):
    """Per-frame shapes of each required feature (the file's shape without its ``T``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shapes: dict[str, list[int]]


ConfigT = TypeVar("ConfigT", bound=FamilyConfig)
SpecT = TypeVar("SpecT", bound=ModelSpec)
Batch = dict[str, torch.Tensor]


class ModelFamily(ABC, Generic[ConfigT, SpecT]):
    """What a stage can ask of a family. Subclasses register with ``registry.register``.

    Class attributes:

    - ``name``: the ``family`` tag (config discriminator, checkpoint record, weights header);
    - ``config_type`` / ``spec_type``: the family's config and spec classes;
    - ``features``: feature family -> tensor name inside its safetensors file, for every
      feature the family reads (the stages check and pass exactly these);
    - ``uses_memory_bank``: whether training and sampling read the engram stage's bank.
    """

    name: ClassVar[str]
    config_type: ClassVar[type[FamilyConfig]]
    spec_type: ClassVar[type[ModelSpec]]
    features: ClassVar[dict[str, str]]
    uses_memory_bank: ClassVar[bool] = False

    def __init__(self, config: ConfigT | None = None):
        self.config: ConfigT = config if config is not None else self.config_type()  # type: ignore[assignment]

    # ------------------------------------------------------------------ spec and model

    @abstractmethod
    def make_spec(self, layout: DataLayout) -> SpecT:
        """The spec for data of this layout; ``ValueError`` for a layout the family cannot use."""

    def parse_spec(self, payload: str) -> SpecT:
        spec = self.spec_type.model_validate_json(payload)
        if spec.family != self.name:
            raise ValueError(f"spec of family {spec.family!r}, not {self.name!r}")
        return spec  # type: ignore[return-value]

    @abstractmethod
    def build(self, spec: SpecT) -> torch.nn.Module:
        """A freshly initialised network (seeded by the caller's ``torch.manual_seed``)."""

    def describe(self, spec: SpecT) -> str:
        """A short line for logs."""
        return spec.to_json()

    def save_weights(self, path: Path, model: torch.nn.Module, spec: SpecT) -> None:
        """``state_dict`` as safetensors, the spec JSON and family in the header metadata."""
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(path), metadata={"model_spec": spec.to_json(), "family": self.name})

    def load_model(self, path: Path, spec: SpecT) -> torch.nn.Module:
        """Rebuild from ``spec`` and load safetensors weights strictly (eval mode)."""
        meta = read_metadata(path)
        if meta.get("family", self.name) != self.name:
            raise ValueError(f"{path.name} holds {meta['family']!r} weights, not {self.name!r}")
        model = self.build(spec)
        model.load_state_dict(load_file(str(path)), strict=True)
        return model.eval()

    # ------------------------------------------------------------------ training

    @abstractmethod
    def load_training_data(
        self, spec: SpecT, clips: list[FeatureClip], bank_path: str | None
    ) -> Any:
        """Read the clips into whatever ``training_batch`` samples from (held in memory)."""

    @abstractmethod
    def training_batch(
        self, data: Any, seed: int, step: int, global_batch: int, start: int, stop: int
    ) -> Batch:
        """Rows ``start:stop`` of step ``step``'s global batch, from ``(seed, step)`` only."""

    @abstractmethod
    def training_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        """Forward pass and losses: named scalars, ``"loss"`` being the one to minimise."""

    # ------------------------------------------------------------------ sampling

    @abstractmethod
    def prepare_clip(
        self,
        spec: SpecT,
        features: dict[str, torch.Tensor],
        bank: dict[str, torch.Tensor] | None,
        reference_frame: int,
    ) -> Any:
        """Per-clip conditioning for :meth:`sample`; ``ValueError`` when the clip does not fit."""

    @abstractmethod
    def sample(self, model: torch.nn.Module, clip: Any, frames: torch.Tensor) -> torch.Tensor:
        """Predicted VAE latents ``(len(frames), C, h, w)`` for ``frames`` of a prepared clip,
        on the model's device (the caller moves them to wherever it decodes)."""
