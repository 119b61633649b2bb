"""Running the UNet's resolution levels with mHC streams, Engram and DSA in between.

diffusers' ``UNet2DConditionModel`` is used unchanged (its modules, weights and config);
this module only walks its blocks the way its own ``forward`` does — ``conv_in``, each
down level's (resnet, attention) pairs with a skip after each pair and a downsampler, the
mid block, each up level's resnets (on ``cat(h, skip)``) with attentions and an upsampler,
``conv_norm_out`` / ``conv_act`` — so the extra components can sit *inside* a level:

- **mHC** (``spec.mhc.enabled``): within a level the hidden state is ``n`` streams
  ``(N, n, C, H, W)``; every width-preserving block (a resnet or transformer computes
  ``x + f(x)`` itself) runs under its own :class:`~generators.blocks.mhc.HyperConnection`.
  A block that changes the width (a level's first resnet when the channel count changes)
  runs on the plain tensor; the streams are expanded after it. Every read of the state — a
  skip connection, the down/up-sampler input, the level's output — goes through its own
  :class:`~generators.blocks.mhc.StreamCollapse`. The streams never cross a level.
- **Engram** at ``spec.engram.levels``: after the level's first resnet (before its first
  attention), on every stream.
- **DSA temporal self-attention** at ``spec.dsa.levels``: after the level's last block,
  before its last skip is read; tokens are the sample's ``F × H × W`` positions.

With all three off the walk computes exactly what ``unet(...)`` computes (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from generators.blocks.dsa import DSAConfig, SparseSelfAttention
from generators.blocks.engram import Engram
from generators.blocks.mhc import HyperConnection, StreamCollapse, expand
from generators.musetalk2.config import engram_config

Block = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Context:
    """Per-forward inputs every level needs."""

    emb: torch.Tensor  # (N, time_embed_dim)
    audio: torch.Tensor  # (N, K, D) cross-attention tokens
    frames: int  # frames per sample (N = samples × frames)
    engram_rows: torch.Tensor | None = None  # (N, R)
    aux: list[torch.Tensor] = field(default_factory=list)  # DSA indexer KL terms


class TemporalAttention(nn.Module):
    """DSA self-attention over the ``F·H·W`` tokens of each sample (residual, zero-init out)."""

    def __init__(self, channels: int, cfg: DSAConfig):
        super().__init__()
        self.attn = SparseSelfAttention(channels, cfg)

    def forward(self, h: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, hh, ww = h.shape
        tokens = h.view(n // frames, frames, c, hh * ww).permute(0, 1, 3, 2)
        tokens = tokens.reshape(n // frames, frames * hh * ww, c)
        frame_ids = torch.arange(frames, device=h.device).repeat_interleave(hh * ww)
        out, kl = self.attn(tokens, frame_ids)
        out = out.view(n // frames, frames, hh * ww, c).permute(0, 1, 3, 2)
        return out.reshape(n, c, hh, ww), kl


class LevelComponents(nn.Module):
    """The HyperConnections, collapses, Engram and DSA modules of every level, by key.

    Built by a dry walk over the UNet's structure in :func:`run_unet`'s order (widths
    only), so the parameter set is fixed at construction, named after the block it belongs
    to (``down1_res0``, ...), and holds no module the walk would not use: a collapse exists
    only where the level's state is streams when it is read.
    """

    def __init__(self, unet: UNet2DConditionModel, spec) -> None:
        super().__init__()
        self.n = spec.mhc.streams if spec.mhc.enabled else 0
        self.hc = nn.ModuleDict()
        self.collapse = nn.ModuleDict()
        self.engram = nn.ModuleDict()
        self.temporal = nn.ModuleDict()
        engram_cfg = engram_config(spec)
        dsa_cfg = DSAConfig(**spec.dsa.model_dump(exclude={"enabled", "levels"}))
        iters = spec.mhc.sinkhorn_iters
        for level, width, events in _structure(unet):
            streams = False
            for kind, key, wraps in events:
                if kind == "engram" and spec.engram.enabled and level in spec.engram.levels:
                    self.engram[level] = Engram(engram_cfg, width, max(1, self.n))
                    streams = streams or bool(self.n)
                elif kind == "temporal" and spec.dsa.enabled and level in spec.dsa.levels:
                    self.temporal[level] = TemporalAttention(width, dsa_cfg)
                    kind, wraps = "block", True
                if kind == "block" and self.n:
                    if wraps:
                        self.hc[key] = HyperConnection(self.n, width, iters)
                        streams = True
                    elif streams:
                        raise ValueError(f"{key} changes the width inside mHC streams")
                elif kind == "read" and streams:
                    self.collapse[key] = StreamCollapse(self.n, width)


def _structure(unet: UNet2DConditionModel):
    """``(level, width, events)`` per level, each event ``(kind, key, width-preserving)``
    with kind ``block`` / ``engram`` / ``temporal`` / ``read``, in :func:`run_unet`'s order."""
    widths = list(unet.config.block_out_channels)
    width = widths[0]
    for i, blk in enumerate(unet.down_blocks):
        events = []
        last = len(blk.resnets) - 1
        for j, res in enumerate(blk.resnets):
            events.append(("block", f"down{i}_res{j}", res.in_channels == res.out_channels))
            if j == 0:
                events.append(("engram", "", False))
            if getattr(blk, "attentions", None) is not None:
                events.append(("block", f"down{i}_attn{j}", True))
            if j == last:
                events.append(("temporal", f"down{i}_dsa", True))
            events.append(("read", f"down{i}_skip{j}", False))
        events.append(("read", f"down{i}_out", False))
        width = widths[i]
        yield f"down{i}", width, events
    mid = unet.mid_block
    events = [("block", "mid_res0", True), ("engram", "", False)]
    for j in range(len(mid.attentions)):
        events += [("block", f"mid_attn{j}", True), ("block", f"mid_res{j + 1}", True)]
    events += [("temporal", "mid_dsa", True), ("read", "mid_out", False)]
    yield "mid", width, events
    for i, blk in enumerate(unet.up_blocks):
        out = blk.resnets[0].out_channels
        events = []
        last = len(blk.resnets) - 1
        for j in range(len(blk.resnets)):
            events.append(("block", f"up{i}_res{j}", (width if j == 0 else out) == out))
            if j == 0:
                events.append(("engram", "", False))
            if getattr(blk, "attentions", None) is not None:
                events.append(("block", f"up{i}_attn{j}", True))
            if j == last:
                events.append(("temporal", f"up{i}_dsa", True))
        events.append(("read", f"up{i}_out", False))
        width = out
        yield f"up{i}", width, events


def _get(modules: nn.ModuleDict, key: str) -> nn.Module | None:
    return next((m for k, m in modules.items() if k == key), None)


class _State:
    """The hidden state of one level: a plain tensor or mHC streams."""

    def __init__(self, comps: LevelComponents, level: str, h: torch.Tensor, ctx: Context):
        self.c, self.level, self.ctx = comps, level, ctx
        self.h: torch.Tensor | None = h
        self.s: torch.Tensor | None = None

    def run(self, key: str, block: Block) -> None:
        hc = _get(self.c.hc, key)
        if hc is None:
            if self.s is not None:
                raise RuntimeError(f"{key}: a width-changing block inside mHC streams")
            self.h = block(self.h)
            return
        if self.s is None:
            self.s, self.h = expand(self.h, self.c.n), None
        self.s = hc(self.s, block)

    def read(self, key: str) -> torch.Tensor:
        return self.h if self.s is None else self.c.collapse[key](self.s)

    def engram(self) -> None:
        module = _get(self.c.engram, self.level)
        if module is None:
            return
        if self.ctx.engram_rows is None:
            raise ValueError(f"{self.level}: Engram is on but the batch has no engram_rows")
        if self.c.n and self.s is None:
            self.s, self.h = expand(self.h, self.c.n), None
        if self.s is None:
            self.h = module(self.h.unsqueeze(1), self.ctx.engram_rows, self.ctx.frames)[:, 0]
        else:
            self.s = module(self.s, self.ctx.engram_rows, self.ctx.frames)

    def temporal(self) -> None:
        module = _get(self.c.temporal, self.level)
        if module is None:
            return

        def block(h: torch.Tensor) -> torch.Tensor:
            out, kl = module(h, self.ctx.frames)
            self.ctx.aux.append(kl)
            return out

        self.run(f"{self.level}_dsa", block)


def _attend(attn, h: torch.Tensor, ctx: Context) -> torch.Tensor:
    return attn(h, encoder_hidden_states=ctx.audio, return_dict=False)[0]


def run_unet(
    unet: UNet2DConditionModel, comps: LevelComponents, h: torch.Tensor, ctx: Context
) -> torch.Tensor:
    """``conv_in`` output → the features before ``conv_out`` (after norm and activation)."""
    skips = [h]
    for i, blk in enumerate(unet.down_blocks):
        st = _State(comps, f"down{i}", h, ctx)
        attns = getattr(blk, "attentions", None)
        last = len(blk.resnets) - 1
        for j, res in enumerate(blk.resnets):
            st.run(f"down{i}_res{j}", lambda x, res=res: res(x, ctx.emb))
            if j == 0:
                st.engram()
            if attns is not None:
                st.run(f"down{i}_attn{j}", lambda x, a=attns[j]: _attend(a, x, ctx))
            if j == last:
                st.temporal()
            skips.append(st.read(f"down{i}_skip{j}"))
        h = st.read(f"down{i}_out")
        if blk.downsamplers is not None:
            for down in blk.downsamplers:
                h = down(h)
            skips.append(h)
    mid = unet.mid_block
    st = _State(comps, "mid", h, ctx)
    st.run("mid_res0", lambda x: mid.resnets[0](x, ctx.emb))
    st.engram()
    for j, (attn, res) in enumerate(zip(mid.attentions, mid.resnets[1:], strict=True)):
        st.run(f"mid_attn{j}", lambda x, a=attn: _attend(a, x, ctx))
        st.run(f"mid_res{j + 1}", lambda x, r=res: r(x, ctx.emb))
    st.temporal()
    h = st.read("mid_out")
    for i, blk in enumerate(unet.up_blocks):
        st = _State(comps, f"up{i}", h, ctx)
        attns = getattr(blk, "attentions", None)
        last = len(blk.resnets) - 1
        for j, res in enumerate(blk.resnets):
            skip = skips.pop()
            st.run(f"up{i}_res{j}", lambda x, r=res, s=skip: r(torch.cat([x, s], 1), ctx.emb))
            if j == 0:
                st.engram()
            if attns is not None:
                st.run(f"up{i}_attn{j}", lambda x, a=attns[j]: _attend(a, x, ctx))
            if j == last:
                st.temporal()
        h = st.read(f"up{i}_out")
        if blk.upsamplers is not None:
            size = skips[-1].shape[2:] if skips else None
            for up in blk.upsamplers:
                h = up(h, size)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return h
