"""The blocks' hyper-parameters as pydantic models, without torch.

A family config embeds these (``musetalk2``'s ``pmf``; its spec's Engram options become an
:class:`EngramConfig`), and family configs are read wherever a pipeline config is
validated, so they live apart from the torch modules that use them
(:mod:`generators.blocks.engram`, :mod:`generators.blocks.pmf`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngramConfig(BaseModel):
    """The Engram module's vocabulary, hashing and sizes (:mod:`generators.blocks.engram`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(64, ge=1)  # number of distinct codes (k-means K or CTC vocab)
    orders: list[int] = [2, 3]
    heads_per_order: int = Field(4, ge=1)
    table_size: int = Field(1021, ge=2)  # each head's table: a distinct prime ≥ this
    head_dim: int = Field(16, ge=1)
    window: str = Field("causal", pattern="^(causal|centred)$")
    conv_kernel: int = Field(4, ge=1)
    seed: int = 0


class PMFConfig(BaseModel):
    """Objective hyper-parameters (pMF B/16 defaults; see :mod:`generators.blocks.pmf`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    p_mean: float = 0.8  # logit-normal location of t and r
    p_std: float = Field(0.8, gt=0)
    data_proportion: float = Field(0.5, ge=0, le=1)  # share of each batch with r = t
    t_min: float = Field(0.05, gt=0, lt=1)  # clip(t, t_min, 1) in the velocity denominators
    norm_p: float = 1.0  # adaptive weight exponent
    norm_eps: float = 0.01
    v_loss_weight: float = 1.0  # auxiliary v-head term
    jvp: Literal["exact", "finite_difference"] = "exact"  # how du/dt is computed (pmf's doc)
    fd_scheme: Literal["central", "one_sided"] = "central"
    # h in units of t. The UNet embeds 1000·t sinusoidally (top frequency 1000 rad per unit
    # t), so u turns on a t-scale of 1e-3: central at 5e-5 balances the h² truncation against
    # float32 rounding (one_sided's optimum is ≈1e-5); see pmf's module docstring
    fd_step: float = Field(5e-5, gt=0, le=1e-2)
