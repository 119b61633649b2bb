"""The contract between the stages and a model family.

A family is three classes: its config (:class:`~generators.family_config.FamilyConfig`
subclass, the user-facing knobs), its spec (:class:`~generators.family_config.ModelSpec`
subclass, everything needed to rebuild the network, derived from the config and the
training data's shapes, stored as JSON with every checkpoint) and a :class:`ModelFamily`
subclass with the methods below. The stages call nothing else. The config and spec bases
and the plain values below live in :mod:`generators.family_config` (no torch), so a
family's ``config.py`` and the stages' planning read them without importing a network;
everyone imports them from there.

Data crosses the boundary as plain values: :class:`FeatureClip` (a clip's feature files
as local safetensors paths, keyed by feature family: ``vae_latents``, ``hubert``,
``sensevoice``, ...), :class:`DataLayout` (per-frame shapes common to all training clips),
:class:`TrainingAssets` (frozen loss models as local paths), tensors read from those
files, and the memory bank as a dict of tensors
(:func:`generators.blocks.engram_hash.read_bank`).

Training contract: ``training_batch(data, seed, step, global_batch, start, stop)`` returns
rows ``start:stop`` of the global batch of ``step``, drawn from ``(seed, step)`` alone, so
ranks take disjoint slices of one batch and a resumed run sees the batches an
uninterrupted run would (no data-loader state in checkpoints). ``training_step`` returns
named scalar tensors; ``"loss"`` is what the optimiser minimises, the others are logged.
It may receive the DDP/FSDP-wrapped module: a family calls it (so DDP synchronises the
gradients) and reads attributes from ``unwrap(model)``.

Lifecycle in a training worker (the train stage's loop, see ``notes`` contract):
``build`` → ``prepare_model`` (fresh initialisation from the training data, e.g. Engram
tables from the memory bank) → at step 0 ``init_from_parent`` or ``transfer_weights``, or
the run's own checkpoint on resume → ``set_training_assets`` (frozen models for the losses,
as local paths) → ``training_batch`` / ``training_step`` per micro-step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
from safetensors.torch import load_file

from generators.family_config import (
    DataLayout,
    FamilyConfig,
    FeatureClip,
    ModelSpec,
    TrainingAssets,
)
from generators.io import read_metadata
from models.safetensors_io import save_file


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside DDP / FSDP / accelerate wrappers (their ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


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
    - ``uses_memory_bank``: whether training and sampling read the engram stage's bank;
    - ``clip_features``: features whose tensor has no frame axis (full shape in the layout,
      no frame-count check), e.g. one reference frame's DINOv2 tokens;
    - ``row_features``: features whose tensor has its own time axis of any length (its
      first axis is dropped in the layout, no frame-count check), e.g. SenseVoice rows;
    - ``extra_tensors``: further tensors of a declared feature file the stages read and
      pass to :meth:`prepare_clip` keyed ``"family/tensor"`` (no shape checks).

    A family whose needs depend on its config may set ``features`` / ``extra_tensors`` /
    ``uses_memory_bank`` per instance; sampling asks :meth:`features_for` /
    :meth:`extra_tensors_for` / :meth:`uses_memory_bank_for` with the checkpoint's spec.
    """

    name: ClassVar[str]
    config_type: ClassVar[type[FamilyConfig]]
    spec_type: ClassVar[type[ModelSpec]]
    features: ClassVar[dict[str, str]]
    uses_memory_bank: ClassVar[bool] = False
    clip_features: ClassVar[frozenset[str]] = frozenset()
    row_features: ClassVar[frozenset[str]] = frozenset()
    extra_tensors: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, config: ConfigT | None = None):
        self.config: ConfigT = config if config is not None else self.config_type()  # type: ignore[assignment]
        self.assets = TrainingAssets()

    def features_for(self, spec: SpecT) -> dict[str, str]:
        """Feature family -> tensor name that sampling a checkpoint of ``spec`` reads."""
        return dict(self.features)

    def extra_tensors_for(self, spec: SpecT) -> dict[str, tuple[str, ...]]:
        return dict(self.extra_tensors)

    def uses_memory_bank_for(self, spec: SpecT) -> bool:
        """Whether sampling a checkpoint of ``spec`` reads the memory bank."""
        return self.uses_memory_bank

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

    def init_from_parent(
        self, model: torch.nn.Module, spec: SpecT, parent_weights: Path, parent_spec_json: str
    ) -> None:
        """Load a committed checkpoint of the previous training stage (default: strict)."""
        model.load_state_dict(load_file(str(parent_weights)), strict=True)

    def transfer_weights(
        self, model: torch.nn.Module, spec: SpecT, weights: Path, source_family: str
    ) -> dict[str, int]:
        """Initialise from another family's official weights; returns tensor counts."""
        raise ValueError(f"{self.name} cannot take weights of {source_family!r}")

    def load_official(self, weights: Path, layout: DataLayout) -> tuple[SpecT, torch.nn.Module]:
        """A released checkpoint of this family as a sampling baseline (spec, eval model)."""
        raise ValueError(f"{self.name} has no official-weights loader")

    # ------------------------------------------------------------------ training

    def needs_vae_decoder(self) -> bool:
        """Whether the losses decode predictions through the features' VAE."""
        return False

    def set_training_assets(self, assets: TrainingAssets) -> None:
        """Local paths of the frozen models (once per worker, before the first step)."""
        self.assets = assets

    def prepare_model(self, model: torch.nn.Module, spec: SpecT, data: Any) -> None:
        """Fresh initialisation from the training data, right after :meth:`build`."""

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
