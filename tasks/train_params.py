"""Which parameters train, at which learning rate, and the optimizer / scheduler built on them.

Patterns are Python regular expressions ``re.fullmatch``-ed against the names of the bare
model's ``named_parameters()`` (what the family's ``build`` returns, before any DDP/FSDP
wrapping). The seed's Phase 9.2 migration phases map one to one: ``train: ["adapter.*"]``
is ``trainable``, ``freeze: ["unet.*"]`` is ``frozen``.

A parameter trains iff it still has ``requires_grad`` after the family built (and maybe
initialised) the model, matches some ``trainable`` pattern and no ``frozen`` pattern. A
pattern that matches nothing is an error: a misspelt module name must not silently train
(or freeze) the wrong thing.
"""

from __future__ import annotations

import re

import torch
from diffusers.optimization import get_scheduler

from tasks.train_config import TrainStageConfig


def _matches(name: str, patterns: list[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def apply_trainable(model: torch.nn.Module, cfg: TrainStageConfig) -> list[str]:
    """Set ``requires_grad`` from the patterns; returns the trained parameter names.

    ``ValueError`` when a pattern (trainable, frozen or an lr group's) matches no parameter,
    or when nothing is left to train.
    """
    names = [n for n, _ in model.named_parameters()]
    patterns = [*cfg.trainable, *cfg.frozen, *(g.pattern for g in cfg.lr_groups)]
    unmatched = [p for p in patterns if not any(re.fullmatch(p, n) for n in names)]
    if unmatched:
        raise ValueError(
            f"parameter patterns {unmatched} match no parameter of the model "
            f"(names look like {names[:3]})"
        )
    for name, param in model.named_parameters():
        if not _matches(name, cfg.trainable) or _matches(name, cfg.frozen):
            param.requires_grad_(False)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trained:
        raise ValueError("the trainable/frozen patterns leave no parameter to train")
    return trained


def optimizer_groups(model: torch.nn.Module, cfg: TrainStageConfig) -> list[dict]:
    """Torch param groups: one per ``lr_groups`` entry (first match wins), then the rest at
    ``learning_rate``. Groups without parameters are left out; each carries its ``name``."""
    groups = [{"name": g.pattern, "lr": g.lr, "params": []} for g in cfg.lr_groups]
    rest = {"name": "default", "lr": cfg.learning_rate, "params": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        target = next((g for g in groups if re.fullmatch(g["name"], name)), rest)
        target["params"].append(param)
    return [g for g in (*groups, rest) if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: TrainStageConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (the seed's ``adam_*`` solver keys)."""
    return torch.optim.AdamW(
        optimizer_groups(model, cfg),
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.adam_weight_decay,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainStageConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' schedulers (MuseTalk's ``solver.lr_scheduler``), stepped once per
    optimizer step (not prepared by accelerate, which would step it once per process)."""
    return get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.steps,
    )
