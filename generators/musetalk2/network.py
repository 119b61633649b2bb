"""The MuseTalk 2.0 network: channel adapter → diffusers UNet (1.5 layout) → u- and v-heads.

Per frame the input is, on channels, ``[masked target (C), reference (C), z_t (C), mask (1)]``
(``C`` = the VAE's latent channels: 16 for FLUX.1): the target latents with the mouth region
zeroed (``mask = 1`` there; its upper edge moves under Dynamic Margin Sampling, so the mask
is an input), another frame's latents for identity, and the noisy target ``z_t`` of pixel
MeanFlow. A 1×1 **channel adapter** (Phase 1.2: xavier init with gain ``adapter_init_gain``,
0.01 — near zero) maps them to the UNet's ``in_channels`` (8 in the MuseTalk 1.5 layout), so
the 1.5 ``conv_in`` can be transferred as is; a stack of near-zero layers, as the seed
sketches, would multiply the small gains and starve the UNet of signal, so it is one layer.

Time: ``t`` goes through the UNet's own sinusoidal ``time_proj`` + ``time_embedding`` (as the
diffusers timestep ``1000·t``, so ``t = 0`` is MuseTalk 1.5's constant timestep 0) and
``t - r`` through ``class_embedding`` (``class_embed_type="timestep"``, the same projection),
added to it; the last layer of that embedding starts at zero.

Heads: ``x̂_u = conv_out(features)`` and ``x̂_v = v_head(features)`` (pMF x-prediction; the
v-head starts as a copy of ``conv_out``). Audio tokens enter through the UNet's cross
attention; gated attention replaces its attention processors (diffusers API, no fork);
mHC, Engram and DSA run inside the levels (:mod:`generators.musetalk2.levels`).

``forward(inputs, mode)`` computes ``"predict"`` (heads at given ``z_t, t, r``), ``"pmf"``
(the full pMF objective, JVP included, *inside* forward so a DDP wrapper sees one forward
and synchronises every gradient) or ``"flow"`` (plain flow matching, the benchmark baseline).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from generators.blocks.config import PMFConfig
from generators.blocks.gated_attention import install_gated_attention
from generators.blocks.pmf import flow_matching_objective, one_step_sample, pmf_objective
from generators.musetalk2.config import Musetalk2Spec
from generators.musetalk2.levels import Context, LevelComponents, run_unet

TIMESTEP_SCALE = 1000.0
COND_KEYS = ("target", "reference", "mask", "audio")


def masked_input(target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The target latents with the mouth region (``mask = 1``) zeroed."""
    return target * (1.0 - mask)


class Musetalk2Net(nn.Module):
    def __init__(self, spec: Musetalk2Spec):
        super().__init__()
        self.spec = spec
        c = spec.latent_channels
        self.adapter = nn.Conv2d(spec.adapter_in_channels, spec.unet_config["in_channels"], 1)
        nn.init.xavier_uniform_(self.adapter.weight, gain=spec.adapter_init_gain)
        nn.init.zeros_(self.adapter.bias)
        self.unet = UNet2DConditionModel(**spec.unet_config)
        nn.init.zeros_(self.unet.class_embedding.linear_2.weight)
        nn.init.zeros_(self.unet.class_embedding.linear_2.bias)
        width = spec.unet_config["block_out_channels"][0]
        self.v_head = nn.Conv2d(width, c, 3, padding=1)
        self.v_head.load_state_dict(self.unet.conv_out.state_dict())
        g = spec.gated_attention
        if g.enabled:
            install_gated_attention(self.unet, g.mode, g.init_bias)
        self.levels = LevelComponents(self.unet, spec)

    # ------------------------------------------------------------------ one evaluation

    def predict(
        self,
        cond: dict[str, torch.Tensor],
        z_t: torch.Tensor,
        t: torch.Tensor,
        r: torch.Tensor,
        frames: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x̂_u, x̂_v, aux)`` for rows ``(N, ...)`` of whole samples of ``frames`` frames."""
        if z_t.shape[0] % frames:
            raise ValueError(f"{z_t.shape[0]} rows are not whole samples of {frames} frames")
        x = torch.cat(
            [masked_input(cond["target"], cond["mask"]), cond["reference"], z_t, cond["mask"]], 1
        )
        h = self.adapter(x.to(self.adapter.weight.dtype))
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=h, timestep=t * TIMESTEP_SCALE))
        emb = emb + unet.get_class_embed(sample=h, class_labels=(t - r) * TIMESTEP_SCALE)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        ctx = Context(emb, cond["audio"].to(h.dtype), frames, cond.get("engram_rows"))
        feats = run_unet(unet, self.levels, unet.conv_in(h), ctx)
        aux = torch.stack(ctx.aux).mean() if ctx.aux else feats.new_zeros(())
        return unet.conv_out(feats), self.v_head(feats), aux

    def _fn(self, cond: dict[str, torch.Tensor], frames: int):
        def fn(z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, rows: torch.Tensor):
            sub = {k: v[rows] for k, v in cond.items()}
            return self.predict(sub, z, t, r, frames)

        return fn

    # ------------------------------------------------------------------ forward

    def forward(
        self, inputs: dict[str, torch.Tensor], mode: str = "predict", pmf: PMFConfig | None = None
    ) -> dict[str, Any]:
        frames = int(inputs.get("frames", torch.tensor(self.spec.n_sample_frames)))
        cond = {k: inputs[k] for k in (*COND_KEYS, "engram_rows") if k in inputs}
        if mode == "predict":
            xu, xv, aux = self.predict(cond, inputs["z_t"], inputs["t"], inputs["r"], frames)
            return {"x_u": xu, "x_v": xv, "aux": aux}
        if mode == "sample":
            x = one_step_sample(self._fn(cond, frames), inputs["noise"])
            return {"x": x}
        cfg = pmf or PMFConfig()
        target = inputs["target"].float()
        if mode == "pmf":
            terms = pmf_objective(
                self._fn(cond, frames), target, inputs["noise"], inputs["t"], inputs["r"], cfg
            )
            return {
                "pmf": terms.loss,
                "pmf_raw_u": terms.raw_u.mean(),
                "x_pred": terms.x_pred,
                "aux": terms.aux,
            }
        if mode == "flow":
            loss = flow_matching_objective(
                self._fn(cond, frames), target, inputs["noise"], inputs["t"], cfg
            )
            return {"flow": loss}
        raise ValueError(f"unknown mode {mode!r}")
