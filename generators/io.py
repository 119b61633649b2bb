"""Safetensors reading helpers shared by the wing and the stages (headers and tensors only).

Header reads (:func:`tensor_shape`, :func:`read_metadata`) open files with safetensors'
numpy framework: the same header validation as torch's, without importing torch, so a
stage can check feature files while it plans or builds a manifest. :func:`read_tensor`
returns a torch tensor (torch is imported by safetensors when it is called).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

if TYPE_CHECKING:
    import torch


def tensor_shape(path: str | Path, name: str) -> list[int]:
    """Shape of tensor ``name`` in a safetensors file, from the header only."""
    with safe_open(str(path), framework="numpy") as f:
        if name not in f.keys():  # noqa: SIM118 - safe_open has no __contains__
            raise KeyError(f"{Path(path).name} has no tensor {name!r}")
        return list(f.get_slice(name).get_shape())


def read_tensor(path: str | Path, name: str) -> torch.Tensor:
    """Tensor ``name`` of a safetensors file; ``KeyError`` naming both when it is not there."""
    with safe_open(str(path), framework="pt") as f:
        if name not in f.keys():  # noqa: SIM118 - safe_open has no __contains__
            raise KeyError(f"{Path(path).name} has no tensor {name!r}")
        return f.get_tensor(name)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a safetensors file."""
    with safe_open(str(path), framework="numpy") as f:
        return dict(f.metadata() or {})
