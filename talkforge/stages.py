"""The stage registry, in pipeline order: download → faces → quality → features → engram →
train → generate → evaluate → evaluate_set."""

from __future__ import annotations

from typing import Any

from tasks.base import Stage
from tasks.download.stage import DownloadStage
from tasks.engram import EngramStage
from tasks.evaluate import EvaluateStage
from tasks.evaluate_set import EvaluateSetStage
from tasks.faces import FacesStage
from tasks.features import FeaturesStage
from tasks.generate import GenerateStage
from tasks.quality import QualityStage
from tasks.train import TrainStage

STAGES: dict[str, type[Stage[Any]]] = {
    cls.name: cls
    for cls in (
        DownloadStage,
        FacesStage,
        QualityStage,
        FeaturesStage,
        EngramStage,
        TrainStage,
        GenerateStage,
        EvaluateStage,
        EvaluateSetStage,
    )
}
STAGE_ORDER: list[str] = list(STAGES)
