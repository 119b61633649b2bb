"""The train stage's hand-off to its ranks (manifest) and the resumable training checkpoint.

Family-agnostic: the manifest lists the training clips' feature files (local paths plus
content hashes), the memory bank, the per-frame feature shapes, the stage's
hyper-parameters and the model family's own config (validated against the registry's
union, so a rank rebuilds exactly the family the stage was configured with). What a
sample is, how batches are drawn and what the loss is belong to the family
(:mod:`generators`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open
from safetensors.torch import save_file

from generators import registry
from generators.family import DataLayout, FeatureClip, ModelFamily, ModelSpec

MANIFEST_NAME = "manifest.json"
CHECKPOINT_NAME = "checkpoint.safetensors"
HISTORY_NAME = "history.jsonl"
RANKS_DIR = "ranks"

FamilyConfigUnion = registry.config_union()


class ClipEntry(FeatureClip):
    """One training clip's feature files (local paths) with their content hashes."""

    sha256: dict[str, str]  # feature family -> artifact sha256


class TrainManifest(BaseModel):
    """Everything a worker process needs; written as JSON by the train stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    work_dir: str
    model: FamilyConfigUnion  # the family and its own config
    clips: list[ClipEntry]
    bank_path: str | None
    bank_sha256: str | None
    layout: DataLayout
    steps: int
    learning_rate: float
    batch_size: int  # per process
    num_processes: int
    checkpoint_every: int
    seed: int
    skipped: list[str] = []  # clips left out, with the reason (information only)

    def family(self) -> ModelFamily:
        return registry.instantiate(self.model)

    def spec(self) -> ModelSpec:
        return self.family().make_spec(self.layout)

    def fingerprint(self) -> str:
        """Hash of what defines the training run (content hashes, not local paths)."""
        payload = self.model_dump(mode="json", exclude={"work_dir", "bank_path", "skipped"})
        for clip in payload["clips"]:
            clip.pop("paths")
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    @classmethod
    def read(cls, path: Path) -> TrainManifest:
        return cls.model_validate_json(path.read_text())


# ---------------------------------------------------------------------------- checkpoints


@dataclass
class CheckpointState:
    """A training checkpoint read back from safetensors (no pickle anywhere)."""

    step: int
    manifest_fingerprint: str
    model: dict[str, torch.Tensor]
    optimizer: dict  # torch optimizer ``state_dict()`` layout


def save_checkpoint(
    path: Path,
    step: int,
    manifest_fingerprint: str,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    spec: ModelSpec,
) -> None:
    """Write model weights and flattened optimizer state to one safetensors file, atomically.

    Optimizer tensors become ``optim.<param index>.<key>`` (``step``, ``exp_avg``, …); the
    param groups (hyper-parameters, JSON-safe) and the step go into the header metadata.
    The file is written under a temporary name in the same folder and renamed over the
    previous checkpoint, so a reader sees either the old or the new one, whole.
    """
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model_state.items()}
    for idx, state in optimizer_state["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim.{idx}.{key}"] = t.detach().contiguous().cpu()
    meta = {
        "step": step,
        "manifest_fingerprint": manifest_fingerprint,
        "param_groups": optimizer_state["param_groups"],
        "family": spec.family,
        "model_spec": json.loads(spec.to_json()),
        "format": 1,
    }
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file(tensors, str(tmp), metadata={"talkforge_state": json.dumps(meta)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["talkforge_state"])


def load_checkpoint(path: Path) -> CheckpointState:
    meta = read_checkpoint_meta(path)
    model: dict[str, torch.Tensor] = {}
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no iter
            kind, _, rest = key.partition(".")
            if kind == "model":
                model[rest] = f.get_tensor(key)
            elif kind == "optim":
                idx, _, name = rest.partition(".")
                optim_state.setdefault(int(idx), {})[name] = f.get_tensor(key)
    return CheckpointState(
        step=int(meta["step"]),
        manifest_fingerprint=str(meta["manifest_fingerprint"]),
        model=model,
        optimizer={"state": optim_state, "param_groups": meta["param_groups"]},
    )
