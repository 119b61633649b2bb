"""The train stage's hand-off to its workers: the manifest, the job, the work dir's files.

Family-agnostic: the manifest lists the training clips' feature files (local paths plus
content hashes), the memory bank, the per-frame feature shapes, the loop settings, the
world size, where the weights start from, and the model family's own config (validated
against the registry's union, so a worker rebuilds exactly the configured family). What a
sample is, how batches are drawn and what the loss is belong to the family
(:mod:`generators`).

No torch: the train stage plans and writes the manifest with this module alone; the
checkpoint format the workers write (torch tensors) is :mod:`tasks.train_checkpoint`, and
the loop that runs them :mod:`tasks.train_loop`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from generators import registry
from generators.family_config import DataLayout, FeatureClip, ModelSpec, TrainingAssets
from tasks.records import TrainStep
from tasks.train_config import TrainStageConfig

if TYPE_CHECKING:
    from generators.family import ModelFamily

# the work dir's files
MANIFEST_NAME = "manifest.json"
HISTORY_NAME = "history.jsonl"
RANKS_DIR = "ranks"
ATTEMPTS_NAME = "attempts.jsonl"  # in RANKS_DIR: one line per (re)start of the worker group
TENSORBOARD_DIR = "tensorboard"

FamilyConfigUnion = registry.config_union()


class ClipEntry(FeatureClip):
    """One training clip's feature files (local paths) with their content hashes."""

    sha256: dict[str, str]  # feature family -> artifact sha256


class InitSource(BaseModel):
    """Where step 0's weights come from: a committed parent checkpoint or official weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["parent", "weights"]
    path: str  # local safetensors / official checkpoint file
    sha256: str
    family: str  # the parent's family, or the official weights' source family
    spec_json: str = ""  # the parent's model spec (kind == "parent")
    label: str  # e.g. "musetalk2/stage1 <item key>" or "musetalk15-unet <sha256>"


class TrainManifest(BaseModel):
    """Everything a training worker needs; written as JSON by the train stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    work_dir: str
    model: FamilyConfigUnion  # the family and its own config
    settings: TrainStageConfig  # the stage's own fields (loop, optimizer, patterns)
    world_size: int
    use_gpu: bool
    clips: list[ClipEntry]
    bank_path: str | None
    bank_sha256: str | None
    layout: DataLayout
    init: InitSource | None = None
    assets: TrainingAssets = TrainingAssets()  # frozen models the losses need (local paths)
    skipped: list[str] = []  # clips left out, with the reason (information only)

    def family(self) -> ModelFamily:
        return registry.instantiate(self.model)

    def spec(self) -> ModelSpec:
        return self.family().make_spec(self.layout)

    def fingerprint(self) -> str:
        """Hash of what defines the training run: content hashes, not local paths, and not
        the operational knobs (checkpoint cadence, loader processes, retries)."""
        payload = self.model_dump(
            mode="json", exclude={"work_dir", "bank_path", "skipped", "assets"}
        )
        for clip in payload["clips"]:
            clip.pop("paths")
            clip.pop("audio_path")
        if payload["init"]:
            payload["init"].pop("path")
        for knob in ("resources", "checkpoint_every", "data_workers", "max_failures"):
            payload["settings"].pop(knob)
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def write(self, path: Path) -> None:
        tmp = path.with_name(f".tmp-{path.name}")
        tmp.write_text(self.model_dump_json(indent=1))
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> TrainManifest:
        return cls.model_validate_json(path.read_text())


# ---------------------------------------------------------------------------- launcher


@dataclass(frozen=True)
class TrainJob:
    """What a launcher needs to run one training (picklable: it travels to Ray)."""

    manifest_path: Path
    work_dir: Path
    run_name: str  # one per manifest fingerprint: the same name resumes
    world_size: int
    num_cpus: float  # per worker
    num_gpus: float  # per worker; 0 = CPU workers with gloo
    max_failures: int
    env: dict[str, str]  # the lock's run token and owner: every training process carries it


@dataclass(frozen=True)
class TrainResult:
    checkpoint_dir: Path  # the run's last checkpoint (model, optimizer, scheduler, sampler)


class TrainLauncher(Protocol):
    def fit(self, job: TrainJob) -> TrainResult:
        """Run the job to its last step (resuming from its checkpoints); ``ItemFailure``
        when it fails."""


# ---------------------------------------------------------------------------- history


def read_history(path: Path) -> list[TrainStep]:
    if not path.exists():
        return []
    return [TrainStep.model_validate_json(line) for line in path.read_text().splitlines() if line]


def truncate_history(path: Path, last_step: int) -> None:
    """Keep steps ``1..last_step`` (steps logged after the resumed checkpoint are dropped)."""
    kept = [h for h in read_history(path) if h.step <= last_step]
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(f"{h.model_dump_json()}\n" for h in kept))
    os.replace(tmp, path)


def append_history(path: Path, step: TrainStep) -> None:
    with path.open("a") as f:
        f.write(step.model_dump_json() + "\n")
