"""The official MuseTalk 1.5 UNet checkpoint as released (``models/musetalkV15/``), read safely.

Layout of the release (``download_weights.sh``): a folder with ``musetalk.json`` (the
``diffusers.UNet2DConditionModel`` keyword arguments: ``in_channels 8`` = masked + reference
SD-VAE latents, ``out_channels 4``, ``block_out_channels 320/640/1280/1280``,
``cross_attention_dim 384`` for Whisper-tiny, ``attention_head_dim 8``, ``layers_per_block 2``)
and ``unet.pth``, the UNet's plain ``state_dict`` (MuseTalk 1.0 names it
``pytorch_model.bin``). A ``unet.safetensors`` conversion is accepted too. The torch file is
read with ``weights_only=True``: a checkpoint that needs code to unpickle is refused.

Nothing here builds the 2.0 network: :mod:`generators.musetalk2.transfer` maps this state
dict into it, and the ``musetalk15`` family's ``load_official`` samples the UNet itself as an
evaluation baseline (:mod:`generators.musetalk15.official`). The tiny builder writes a
random UNet in the same layout (two levels, same block types and channel roles) for tests of
those paths.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from models.checkpoints import read_state_dict
from models.registry import ModelSpec, ModelUnavailableError, register_tiny_builder

FAMILY = "musetalk15-official"
CONFIG_FILE = "musetalk.json"
WEIGHT_FILES = ("unet.safetensors", "unet.pth", "pytorch_model.bin")


def read_official_unet(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(musetalk.json as a dict, UNet state dict)`` from a release folder."""
    folder = Path(directory).expanduser()
    config = folder / CONFIG_FILE
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if not config.is_file() or weights is None:
        raise ModelUnavailableError(
            f"MuseTalk 1.5 UNet: {folder} needs {CONFIG_FILE} and one of {WEIGHT_FILES}; "
            f"import the release's musetalkV15 folder with `talkforge models import {FAMILY} DIR`"
        )
    try:
        cfg = json.loads(config.read_text())
    except ValueError as exc:
        raise ModelUnavailableError(f"{config}: not JSON ({exc})") from exc
    if not isinstance(cfg, dict) or "block_out_channels" not in cfg:
        raise ModelUnavailableError(f"{config}: not a UNet2DConditionModel config")
    return cfg, read_state_dict(weights, containers=("state_dict",), strip_prefix="module.")


def save_official_unet(directory: Path, unet: UNet2DConditionModel, as_safetensors: bool) -> Path:
    """Write ``unet`` in the release layout (``musetalk.json`` + ``unet.pth`` / safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=1, default=list))
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    if as_safetensors:
        from safetensors.torch import save_file

        path = directory / WEIGHT_FILES[0]
        save_file(state, str(path))
    else:
        path = directory / WEIGHT_FILES[1]
        torch.save(state, path)
    return path


def tiny_musetalk_config(cross_attention_dim: int = 384) -> dict[str, Any]:
    """The MuseTalk 1.5 block layout at two levels and small widths (8 in, 4 out)."""
    return {
        "sample_size": 8,
        "in_channels": 8,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        "cross_attention_dim": cross_attention_dim,
    }


@register_tiny_builder(FAMILY)
def build_tiny_official_unet(directory: Path, seed: int) -> None:
    torch.manual_seed(seed)
    save_official_unet(directory, UNet2DConditionModel(**tiny_musetalk_config()), False)


def official_unet_spec(source: str, tiny_random: bool = False) -> ModelSpec:
    return ModelSpec(family=FAMILY, source=source, tiny_random=tiny_random)
