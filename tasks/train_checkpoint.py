"""The resumable training checkpoint format (torch): what workers write and resume from.

A checkpoint is a directory (what Ray Train's ``Checkpoint`` carries) holding two files:
``state.safetensors`` (``model.<name>`` tensors, and the optimizer state flattened to
``optim.<param name>.<key>``: keyed by parameter name, not position, so it is the same
for DDP and FSDP and survives frozen parameters) and ``state.json`` (step, manifest
fingerprint, optimizer param groups, LR-scheduler state, sampler state, RNG scheme, the
model spec). No pickle anywhere: both read back with safetensors and JSON.

Apart from the manifest (:mod:`tasks.train_data`) so that the train stage plans without
torch; the stage reads the last checkpoint back when it runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from generators.family_config import ModelSpec

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
CHECKPOINT_FORMAT = 2
RNG_SCHEME = "torch.manual_seed(micro_step_seed(seed, micro_step, rank)) before each micro-step"


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
