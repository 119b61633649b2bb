"""The network a DualForce checkpoint holds, and what each training stage trains of it (§9).

:class:`DualForceModel` = ``projector``
(:class:`~generators.dualforce.structure.StructureProjector`) + ``transformer``
(:class:`~generators.dualforce.model.DualForceTransformer`, absent in stage 1), with stage 3's
LoRA adapters when the spec says ``stage3``. Trainable parameters per stage (everything else
has ``requires_grad=False``, so it never enters DDP or the optimiser):

- ``stage1``: the projector (motion ↔ latent, FLAME regression);
- ``stage2``: the video backbone (:func:`~generators.dualforce.model.is_backbone_param`);
- ``stage3``: LoRA adapters on the backbone and every new module — structure stream, fusion,
  audio, heads; the backbone's own weights and the projector stay frozen. (The two learning
  rates of §9, 5e-5 LoRA / 1e-4 new, are the train section's ``lr_groups`` /
  ``learning_rate`` in ``configs/dualforce_stage3.yaml``.)

``forward(batch, losses)`` computes the stage's loss terms, so a DDP-wrapped model is called
as a whole and synchronises its gradients.

:func:`load_parent` starts a stage from the previous stage's weights: stage 2 takes stage 1's
projector (its transformer starts fresh), stage 3 takes stage 2's projector and transformer
(mapped into the LoRA-wrapped layers, adapters starting at zero).
"""

from __future__ import annotations

import torch
from torch import nn

from generators.dualforce.config import PARENT_STAGE, DualForceSpec, LossWeights
from generators.dualforce.lora import apply_stage3_lora, base_name, is_lora_param, merge_lora
from generators.dualforce.model import DualForceTransformer, is_backbone_param
from generators.dualforce.objectives import stage1_losses, stage2_losses, stage3_losses
from generators.dualforce.structure import StructureProjector


class DualForceModel(nn.Module):
    """See the module docstring."""

    def __init__(self, spec: DualForceSpec):
        super().__init__()
        self.stage = spec.training_stage
        self.projector = StructureProjector(spec.arch)
        self.transformer: DualForceTransformer | None = None
        if self.stage != "stage1":
            self.transformer = DualForceTransformer(spec.arch)
        if self.stage == "stage3" and self.transformer is not None:
            apply_stage3_lora(self.transformer, spec.lora)
        for name, p in self.named_parameters():
            p.requires_grad_(is_trainable(self.stage, name))

    def require_transformer(self) -> DualForceTransformer:
        if self.transformer is None:
            raise ValueError("a stage-1 checkpoint holds only the structure projector")
        return self.transformer

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each DiT block in the backward pass (the train section's
        ``gradient_checkpointing``; the full-size model needs it at 32-frame clips)."""
        if self.transformer is not None:
            self.transformer.gradient_checkpointing = True

    def forward(
        self, batch: dict[str, torch.Tensor], losses: LossWeights
    ) -> dict[str, torch.Tensor]:
        """The stage's named loss terms on ``batch`` (:mod:`generators.dualforce.data`)."""
        if self.stage == "stage1":
            return stage1_losses(self.projector, batch, losses.stage1_flame)
        if self.stage == "stage2":
            return stage2_losses(self.require_transformer(), batch)
        return stage3_losses(self.require_transformer(), self.projector, batch, losses)


def is_trainable(stage: str, name: str) -> bool:
    """Whether parameter ``name`` (a :class:`DualForceModel` name) trains in ``stage``."""
    part, _, rest = name.partition(".")
    if stage == "stage1":
        return part == "projector"
    if part != "transformer":
        return False
    if stage == "stage2":
        return is_backbone_param(rest)
    return is_lora_param(rest) or not is_backbone_param(base_name(rest))


@torch.no_grad()
def load_parent(model: DualForceModel, parent: dict[str, torch.Tensor], parent_stage: str) -> None:
    """Load the previous stage's ``state_dict`` into a freshly built ``model``.

    Every key the child expects from its parent must be there with the same shape, and every
    parent key must land somewhere (a mismatch is a ``ValueError`` naming the keys); LoRA
    adapters (stage 3) and the transformer (stage 2, built fresh) are what the parent does
    not provide.
    """
    want = PARENT_STAGE[model.stage]
    if want != parent_stage:
        raise ValueError(f"{model.stage} starts from {want or 'nothing'}, not {parent_stage}")
    own = model.state_dict()
    expected = {
        k
        for k in own
        if not is_lora_param(k) and (model.stage != "stage2" or k.startswith("projector."))
    }
    by_base = {base_name(k): k for k in expected}
    unknown = sorted(set(parent) - set(by_base))
    missing = sorted(set(by_base) - set(parent))
    if unknown or missing:
        raise ValueError(
            f"{parent_stage} weights do not fit {model.stage}: unexpected {unknown[:5]}, "
            f"missing {missing[:5]}"
        )
    for key, value in parent.items():
        target = own[by_base[key]]
        if target.shape != value.shape:
            raise ValueError(f"{key}: {tuple(value.shape)} in {parent_stage}, model wants "
                             f"{tuple(target.shape)}")  # fmt: skip
        target.copy_(value)


def for_inference(model: DualForceModel) -> DualForceModel:
    """Eval mode with stage 3's adapters merged into the backbone weights (same outputs)."""
    if model.transformer is not None:
        merge_lora(model.transformer)
    return model.eval()
