"""The stage registry, in pipeline order: download → faces → quality → features → engram →
train → generate → evaluate → evaluate_set.

:data:`STAGE_PATHS` is the one place a stage is registered: its name and the import path
of its class. The stage modules import torch, cv2, scikit-learn and the model wrappers, so
:data:`STAGES` imports a stage's module only when its class is first asked for: planning
the download stage, ``talkforge status`` or validating a config (each section's typed
config lives in a light ``tasks/<stage>_config.py``) import none of the others.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Iterator, Mapping
from typing import Any

from tasks.base import Stage

STAGE_PATHS: dict[str, str] = {
    "download": "tasks.download.stage:DownloadStage",
    "faces": "tasks.faces:FacesStage",
    "quality": "tasks.quality:QualityStage",
    "features": "tasks.features:FeaturesStage",
    "engram": "tasks.engram:EngramStage",
    "train": "tasks.train:TrainStage",
    "generate": "tasks.generate:GenerateStage",
    "evaluate": "tasks.evaluate:EvaluateStage",
    "evaluate_set": "tasks.evaluate_set:EvaluateSetStage",
}
STAGE_ORDER: list[str] = list(STAGE_PATHS)


class _LazyStages(Mapping[str, type[Stage[Any]]]):
    """Stage name → stage class, each module imported on the first lookup of its stage."""

    def __init__(self, paths: dict[str, str]):
        self._paths = paths
        self._loaded: dict[str, type[Stage[Any]]] = {}

    def __getitem__(self, name: str) -> type[Stage[Any]]:
        if name not in self._loaded:
            cls = pkgutil.resolve_name(self._paths[name])
            if cls.name != name:
                raise TypeError(f"{self._paths[name]} is stage {cls.name!r}, not {name!r}")
            self._loaded[name] = cls
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self._paths

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


STAGES: Mapping[str, type[Stage[Any]]] = _LazyStages(STAGE_PATHS)
