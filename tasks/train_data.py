"""The train stage's hand-off to its workers (manifest) and the resumable checkpoint format.

Family-agnostic: the manifest lists the training clips' feature files (local paths plus
content hashes), the memory bank, the per-frame feature shapes, the loop settings, the
world size, where the weights start from, and the model family's own config (validated
against the registry's union, so a worker rebuilds exactly the configured family). What a
sample is, how batches are drawn and what the loss is belong to the family
(:mod:`generators`).

A checkpoint is a directory (what Ray Train's ``Checkpoint`` carries) holding two files:
``state.safetensors`` (``model.<name>`` tensors, and the optimizer state flattened to
``optim.<param name>.<key>``: keyed by parameter name, not position, so it is the same
for DDP and FSDP and survives frozen parameters) and ``state.json`` (step, manifest
fingerprint, optimizer param groups, LR-scheduler state, sampler state, RNG scheme, the
model spec). No pickle anywhere: both read back with safetensors and JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open
from safetensors.torch import save_file

from generators import registry
from generators.family import DataLayout, FeatureClip, ModelFamily, TrainingAssets
from generators.family_config import ModelSpec
from tasks.records import TrainStep
from tasks.train_config import TrainStageConfig

MANIFEST_NAME = "manifest.json"
HISTORY_NAME = "history.jsonl"
RANKS_DIR = "ranks"
TENSORBOARD_DIR = "tensorboard"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
CHECKPOINT_FORMAT = 2
RNG_SCHEME = "torch.manual_seed(micro_step_seed(seed, micro_step, rank)) before each micro-step"

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


# ---------------------------------------------------------------------------- checkpoints


@dataclass
class CheckpointState:
    """A training checkpoint read back from its directory."""

    step: int
    fingerprint: str
    world_size: int
    model: dict[str, torch.Tensor]
    optimizer: dict  # torch.distributed.checkpoint "full" layout, keyed by parameter name
    scheduler: dict
    sampler: dict
    meta: dict


def _json_safe(value: object) -> object:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def save_checkpoint(
    directory: Path,
    *,
    step: int,
    fingerprint: str,
    world_size: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    scheduler_state: dict,
    sampler: dict,
    spec: ModelSpec,
) -> None:
    """Write one checkpoint into ``directory`` (an empty folder Ray Train then persists).

    ``optimizer_state`` is the name-keyed full layout of
    ``torch.distributed.checkpoint.state_dict.get_state_dict``.
    """
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model_state.items()}
    for name, state in optimizer_state["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim.{name}.{key}"] = t.detach().contiguous().cpu()
    groups = [
        {k: _json_safe(v) for k, v in group.items()} for group in optimizer_state["param_groups"]
    ]
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "fingerprint": fingerprint,
        "world_size": world_size,
        "param_groups": groups,
        "scheduler": {k: _json_safe(v) for k, v in scheduler_state.items()},
        "sampler": sampler,
        "rng": RNG_SCHEME,
        "family": spec.family,
        "model_spec": json.loads(spec.to_json()),
    }
    save_file(tensors, str(directory / STATE_TENSORS))
    (directory / STATE_JSON).write_text(json.dumps(meta, indent=1))


def read_checkpoint_meta(directory: Path) -> dict:
    return json.loads((Path(directory) / STATE_JSON).read_text())


def load_checkpoint(directory: Path, *, with_optimizer: bool = True) -> CheckpointState:
    meta = read_checkpoint_meta(directory)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory}: checkpoint format {meta.get('format')}, not 2")
    model: dict[str, torch.Tensor] = {}
    optim_state: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(Path(directory) / STATE_TENSORS), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no iter
            kind, _, rest = key.partition(".")
            if kind == "model":
                model[rest] = f.get_tensor(key)
            elif kind == "optim" and with_optimizer:
                name, _, field = rest.rpartition(".")
                optim_state.setdefault(name, {})[field] = f.get_tensor(key)
    return CheckpointState(
        step=int(meta["step"]),
        fingerprint=str(meta["fingerprint"]),
        world_size=int(meta["world_size"]),
        model=model,
        optimizer={"state": optim_state, "param_groups": meta["param_groups"]},
        scheduler=meta["scheduler"],
        sampler=meta["sampler"],
        meta=meta,
    )


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
