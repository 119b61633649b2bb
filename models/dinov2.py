"""DINOv2 reference-image features through transformers ``Dinov2Model``.

Family ``dinov2`` (hub: ``facebook/dinov2-base``, 768-d, patch 14). The image processor is
loaded from the same directory or hub id as the model (``AutoImageProcessor``: resize the
short side to 256, centre-crop 224, ImageNet mean/std), so the real checkpoint's own
preprocessing is used. On a 224² input the model returns ``1 + 16 × 16`` tokens: the CLS
token, then the patch tokens in row-major order (plus register tokens for the ``-reg``
variants, which :func:`embed_reference` keeps out of ``patch_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, BitImageProcessor, Dinov2Config, Dinov2Model

from models.registry import ModelUnavailableError, hf_load_kwargs, register_tiny_builder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@register_tiny_builder("dinov2")
def build_tiny_dinov2(directory: Path, seed: int) -> None:
    """Tiny random DINOv2 (hidden 32, 2 layers, patch 14) with the official preprocessing."""
    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=224,
    )
    Dinov2Model(config).save_pretrained(directory)
    BitImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        do_center_crop=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    ).save_pretrained(directory)


@dataclass
class Dinov2Encoder:
    model: Dinov2Model
    processor: BitImageProcessor


def load_dinov2(
    path_or_hub_id: str | Path,
    subfolder: str | None = None,
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> Dinov2Encoder:
    """Model and image processor from a local directory or hub id (offline-safe)."""
    kwargs = hf_load_kwargs(path_or_hub_id, subfolder, revision)
    try:
        model = Dinov2Model.from_pretrained(str(path_or_hub_id), **kwargs)
        processor = AutoImageProcessor.from_pretrained(str(path_or_hub_id), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot load DINOv2 from {path_or_hub_id!s}: {exc}") from exc
    return Dinov2Encoder(model=model.to(device).eval(), processor=processor)


@torch.inference_mode()
def embed_reference(encoder: Dinov2Encoder, image: np.ndarray) -> dict[str, torch.Tensor]:
    """One uint8 RGB image ``(H, W, 3)`` → ``cls`` ``(D,)`` and ``patch_tokens`` ``(N, D)``."""
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected one (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    param = next(encoder.model.parameters())
    pixels = encoder.processor(images=image, return_tensors="pt")["pixel_values"]
    out = encoder.model(pixel_values=pixels.to(param.device, param.dtype))
    hidden = out.last_hidden_state[0].float().cpu()
    registers = getattr(encoder.model.config, "num_register_tokens", 0) or 0
    return {"cls": out.pooler_output[0].float().cpu(), "patch_tokens": hidden[1 + registers :]}
