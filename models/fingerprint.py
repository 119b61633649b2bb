"""What produced an artifact: the record every model wrapper and stage shares.

Lives in ``models/`` (the bottom layer) so model wrappers can return it without importing
the stage layer above them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ModelFingerprint(BaseModel):
    """What produced an artifact: recorded so a tiny random model is never taken for a real one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    source: str  # hub id or local path as configured
    resolved_path: str
    sha256: str  # over the weight files
    origin: str  # "random-init" (built from config here) or "pretrained"
    detail: str = ""
