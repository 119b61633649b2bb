"""Stage 3's parameter regime: LoRA on the video backbone (peft), new modules fully trained.

:func:`apply_stage3_lora` injects peft LoRA adapters into the video stream's attention
projections (block-causal self-attention ``attn1`` and reference attention ``attn2``:
``to_q/to_k/to_v/to_out.0``, rank ``attention_rank``) and FFN linears (``ffn.net.0.proj``,
``ffn.net.2``, rank ``ffn_rank``) of every block. peft initialises ``lora_B`` to zero, so the
adapted model starts exactly equal to the stage-2 model it is loaded from. :func:`merge_lora`
folds the adapters back into plain ``nn.Linear`` weights (same outputs; used for sampling).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from generators.dualforce.config import LoraSettings

_ATTN = r"blocks\.\d+\.video\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
_FFN = r"blocks\.\d+\.video\.ffn\.net\.(0\.proj|2)"


def apply_stage3_lora(transformer: nn.Module, cfg: LoraSettings) -> nn.Module:
    """Inject the adapters into ``transformer`` in place; returns it."""
    config = LoraConfig(
        r=cfg.attention_rank,
        lora_alpha=cfg.attention_rank * cfg.alpha_over_rank,
        target_modules=rf"^({_ATTN}|{_FFN})$",
        rank_pattern={_FFN: cfg.ffn_rank},
        alpha_pattern={_FFN: cfg.ffn_rank * cfg.alpha_over_rank},
        lora_dropout=0.0,
    )
    inject_adapter_in_model(config, transformer)
    return transformer


def is_lora_param(name: str) -> bool:
    return ".lora_" in name


def base_name(name: str) -> str:
    """Parameter name without peft's ``base_layer.`` segment (the unadapted model's name)."""
    return name.replace(".base_layer.", ".")


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
