"""The torch-free half of the family contract: the bases of a family's config and spec.

A family's config and spec classes (its ``config.py``) derive from these and import
nothing heavy, so the train stage's config union (:func:`generators.registry.config_union`)
validates a pipeline config without importing torch or any family's network code. The
rest of the contract, :class:`generators.family.ModelFamily`, lives in
:mod:`generators.family`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class FamilyConfig(BaseModel):
    """Base of a family's config; subclasses narrow ``family`` to ``Literal["<name>"]``."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    family: str
    training_stage: str = "main"  # families with stages narrow it to a Literal


class ModelSpec(BaseModel):
    """Base of a family's model spec (rebuilds the network; stored as JSON, never pickled)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str

    def to_json(self) -> str:
        return self.model_dump_json()
