"""Stage 3's parameter regime: LoRA on the video backbone (peft), new modules fully trained.

:func:`apply_stage3_lora` injects peft LoRA adapters into the video stream's attention
projections (self-attention and reference cross-attention: ``to_q/to_k/to_v/to_out``, rank
``attention_rank``) and FFN linears (rank ``ffn_rank``) of every block, freezes the rest of
the backbone (:func:`~generators.dualforce.model.is_backbone_param`) and leaves every new
module (structure stream, audio, fusion, heads) trainable. :func:`stage3_param_groups` gives
the optimiser its two learning rates; :func:`merge_lora` folds the adapters back into plain
``nn.Linear`` weights (same outputs, the checkpoint then loads into an unadapted model).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from generators.dualforce.config import LoraSettings
from generators.dualforce.model import DualForceTransformer, is_backbone_param

_ATTN = r"blocks\.\d+\.video\.attn[12]\.to_(q|k|v|out)"
_FFN = r"blocks\.\d+\.video\.ffn\.net\.(0\.proj|2)"


def apply_stage3_lora(model: DualForceTransformer, cfg: LoraSettings) -> DualForceTransformer:
    """Inject the adapters in place and set ``requires_grad`` for stage 3; returns ``model``."""
    config = LoraConfig(
        r=cfg.attention_rank,
        lora_alpha=cfg.attention_rank * cfg.alpha_over_rank,
        target_modules=rf"^({_ATTN}|{_FFN})$",
        rank_pattern={_FFN: cfg.ffn_rank},
        alpha_pattern={_FFN: cfg.ffn_rank * cfg.alpha_over_rank},
        lora_dropout=0.0,
    )
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_param(name) or not is_backbone_param(_base_name(name)))
    return model


def is_lora_param(name: str) -> bool:
    return ".lora_" in name


def _base_name(name: str) -> str:
    """Parameter name without peft's ``base_layer.`` wrapper segment."""
    return name.replace(".base_layer.", ".")


def stage3_param_groups(model: nn.Module, cfg: LoraSettings) -> list[dict]:
    """Two optimiser groups: LoRA adapters at ``lr_lora``, new modules at ``lr_new``."""
    lora, new = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (lora if is_lora_param(name) else new).append(p)
    return [{"params": lora, "lr": cfg.lr_lora}, {"params": new, "lr": cfg.lr_new}]


def lora_ranks(model: nn.Module) -> dict[str, int]:
    """Adapter rank of every LoRA-wrapped module (for reports and tests)."""
    return {n: m.r["default"] for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore plain ``nn.Linear`` modules."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model
