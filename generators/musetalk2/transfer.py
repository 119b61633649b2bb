"""Weight transfer into a MuseTalk 2.0 network (Phase 9): official 1.5 UNet, or a parent stage.

Every tensor of the 2.0 network's ``state_dict`` is, by name (the official UNet's keys
under ``unet.``):

- **transferred**: the source has it with the same shape (copied);
- **reshaped**: the source has it with another shape of the same rank — the overlapping
  block is copied, the rest keeps its fresh initialisation (e.g. ``conv_out`` from 4 SD to
  16 FLUX channels, cross-attention ``to_k``/``to_v`` from Whisper's 384-d to SenseVoice's
  512-d; for a different VAE or audio encoder the copied part only spares the warm-up);
- **initialised**: new modules keep their construction init (adapter, v-head, the ``t - r``
  embedding, gates, mHC, Engram, DSA), each chosen so the network starts close to the
  source's function.

From an official 1.5 checkpoint whose VAE has the same latent channels (SD: ``2C`` equals
the UNet's 8 input channels) the adapter is set to pass the masked and reference latents
straight through (identity) and to ignore ``z_t`` and the mask (zeros): the network at
``t = r = 0`` then computes the 1.5 function exactly (with mHC ``n = 1``, gates saturated,
Engram values zero and DSA's zero-initialised output — tested). Otherwise it keeps its
near-zero init. The v-head starts as a copy of ``conv_out`` when that was transferred.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from generators.musetalk2.network import Musetalk2Net
from models.musetalk15_official import read_official_unet


@dataclass
class TransferReport:
    transferred: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # source tensors with no destination

    def counts(self) -> dict[str, int]:
        return {
            "transferred": len(self.transferred),
            "reshaped": len(self.reshaped),
            "initialised": len(self.initialised),
            "unused": len(self.unused),
        }


@torch.no_grad()
def load_matching(model: torch.nn.Module, source: dict[str, torch.Tensor]) -> TransferReport:
    """Copy ``source`` into ``model`` by name: same shape whole, same rank by overlap."""
    report = TransferReport()
    state = model.state_dict()
    for name, dest in state.items():
        src = source.get(name)
        if src is None or src.ndim != dest.ndim:
            report.initialised.append(name)
            continue
        src = src.to(dest.dtype)
        if src.shape == dest.shape:
            dest.copy_(src)
            report.transferred.append(name)
        else:
            block = tuple(slice(0, min(a, b)) for a, b in zip(src.shape, dest.shape, strict=True))
            dest[block] = src[block]
            report.reshaped.append(name)
    report.unused = sorted(set(source) - set(state))
    model.load_state_dict(state, strict=True)
    return report


@torch.no_grad()
def transfer_from_official(net: Musetalk2Net, directory: str | Path) -> TransferReport:
    """Load a MuseTalk 1.5 release folder (``musetalk.json`` + ``unet.pth``/safetensors)."""
    config, state = read_official_unet(directory)
    report = load_matching(net, {f"unet.{k}": v for k, v in state.items()})
    c = net.spec.latent_channels
    adapter = net.adapter
    if int(config.get("in_channels", -1)) == adapter.out_channels == 2 * c:
        adapter.weight.zero_()
        adapter.bias.zero_()
        eye = torch.eye(2 * c, dtype=adapter.weight.dtype)
        adapter.weight[:, : 2 * c, 0, 0] = eye
    if "unet.conv_out.weight" in report.transferred:
        net.v_head.load_state_dict(net.unet.conv_out.state_dict())
    return report


@torch.no_grad()
def transfer_from_parent(net: Musetalk2Net, state: dict[str, torch.Tensor]) -> TransferReport:
    """A previous stage's checkpoint (another spec of this family): matching tensors."""
    return load_matching(net, state)
