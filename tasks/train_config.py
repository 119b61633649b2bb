"""The train stage's typed config: optimisation, distribution, trainable parameters, parent.

``train:`` in the pipeline YAML is :class:`TrainStageConfig` merged with the selected
model family's own config (``registry.config_union``): ``family`` picks the member and the
family's fields (network size, loss weights, ``training_stage``) sit beside these.

Where the seed's training YAMLs (``configs/training/stage1_v2.yaml`` ...) put each key is
listed in ``configs/README.md``; the fields here cover its ``solver`` block, batch size,
checkpointing, the Phase 9.2 ``train``/``freeze`` patterns and the stage-to-stage hand-off.

``resources`` is the Ray Train ``ScalingConfig``: ``num_workers`` training workers, each
with ``num_cpus`` CPUs and ``num_gpus`` GPUs (``num_gpus > 0`` means GPU training with
NCCL; 0 means CPU workers with gloo). Like every stage's resources it is not part of the
item key; a checkpoint records the world size it was written with and is resumed only by
the same world size (``batch_size`` is per worker, so the global batch depends on it).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from generators import registry
from models.registry import ModelSpec
from tasks.base import Resources, StageConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_patterns(patterns: list[str]) -> list[str]:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"{p!r} is not a valid regular expression: {exc}") from None
    return patterns


class LrGroup(_Strict):
    """Parameters whose name fully matches ``pattern`` train at ``lr`` (first match wins)."""

    pattern: str
    lr: float = Field(gt=0)

    @field_validator("pattern")
    @classmethod
    def _valid(cls, v: str) -> str:
        return _check_patterns([v])[0]


class InitFromStage(_Strict):
    """Start from the latest committed checkpoint of ``family`` (default: this run's family)
    trained as ``stage`` — looked up in the catalog when the train stage is planned."""

    stage: str = Field(min_length=1, description="the parent's training_stage")
    family: str | None = None


class InitFromWeights(_Strict):
    """Start from official weights (e.g. the MuseTalk 1.5 UNet) through the family's
    ``transfer_weights``; the weights are resolved and fingerprinted by the model registry."""

    weights: ModelSpec
    source_family: str = Field(min_length=1, description="what the weights are, e.g. musetalk15")


InitFrom = InitFromStage | InitFromWeights


class TrainStageConfig(StageConfig):
    """The stage's own fields; each registered family's config is merged in (``TrainConfig``)."""

    resources: Resources = Resources(num_cpus=1, num_workers=2)
    steps: int = Field(20, ge=1, description="optimizer steps in total (resumes count)")
    batch_size: int = Field(4, ge=1, description="samples per worker per micro-step")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-steps per step")
    learning_rate: float = Field(1e-3, gt=0, description="lr of params in no lr_groups entry")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(0.01, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping (total L2 norm)")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="bf16/fp16: GPU")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="fsdp shards the full-size model")
    gradient_checkpointing: bool = False
    checkpoint_every: int = Field(5, ge=1, description="steps between resumable checkpoints")
    seed: int = 0
    data_workers: int = Field(1, ge=0, le=32, description="loader processes per worker")
    max_failures: int = Field(2, ge=0, description="lost-worker restarts (Ray FailureConfig)")
    trainable: list[str] = Field([".*"], min_length=1, description="regexes of trained params")
    frozen: list[str] = Field([], description="regexes of params kept fixed (win over trainable)")
    lr_groups: list[LrGroup] = Field(default_factory=list, description="per-group lrs")
    init_from: InitFrom | None = None

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, v: object) -> object:
        return "no" if v is False else v  # YAML reads a bare `no` (e.g. --set ...=no) as false

    @field_validator("trainable", "frozen")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        return _check_patterns(v)

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainStageConfig:
        if self.lr_warmup_steps > self.steps:
            raise ValueError(f"lr_warmup_steps {self.lr_warmup_steps} > steps {self.steps}")
        return self


TrainConfig = registry.config_union(TrainStageConfig)


def train_config(**values: object) -> TrainStageConfig:
    """Validate a train section (``family`` selects the member; default musetalk15)."""
    return TypeAdapter(TrainConfig).validate_python(values)


def training_stage(config: BaseModel) -> str:
    """The config's ``training_stage`` (a family config field; ``main`` where a family has
    a single stage and does not declare one)."""
    return str(getattr(config, "training_stage", "main"))
