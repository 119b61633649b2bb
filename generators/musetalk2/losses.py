"""Pixel-space losses of the ``musetalk2`` family through frozen models (VAE, VGG19, SyncNet).

All pixel terms compare ``decode(x̂)`` with ``decode(x)``: the cache holds latents, not
pixels, so the target image is the VAE's reconstruction of the target latents (decoded
without gradient); gradients flow through the frozen decoder into ``x̂`` as in MuseTalk 1.5.
Decoding undoes the features' normalisation exactly as :mod:`models.vae` does
(``z / scale + shift``; FLUX.2: batch-norm statistics and un-patchify).

- ``l1_pixel``: ``mean |decode(x̂) - decode(x)|`` (MuseTalk's ``L1Loss`` on frames);
- ``vgg``: MuseTalk 1.5's pyramid perceptual loss (``train.py``): both images resized to
  224² (bilinear), an anti-aliased image pyramid at scales 1, ½, ¼, ⅛ (Gaussian blur with
  ``σ = (1/s - 1)/2`` then stride ``1/s``, as ``ImagePyramide``), ImageNet VGG19 relu1_1 …
  relu5_1 features, ``Σ_scales Σ_i w_i·mean|φ_i(x̂) - sg φ_i(x)| / Σ w_i``. MuseTalk feeds its
  ``[-1, 1]`` frames to a network normalised for ``[0, 1]``; here they are mapped to
  ``[0, 1]`` first (the normalisation the weights were trained with);
- ``lpips``: LPIPS-VGG distance (``models.lpips_net``), mean over rows;
- ``sync``: LatentSync's SyncNet on each sample's ``F`` decoded frames (resized to its
  resolution, lower half, stacked on channels) against the sample's mel window,
  ``BCE(cos, 1)`` (``models.stable_syncnet``).

Frozen models load once per process, lazily, on the device of the first batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from generators.family_config import TrainingAssets
from models.lpips_net import load_lpips
from models.stable_syncnet import load_stable_syncnet, sync_loss
from models.vae import _bn_stats, _unpatchify, is_flux2, latent_factors, load_vae
from models.vgg import load_vgg19


def _gaussian_pyramid_level(x: torch.Tensor, scale: float) -> torch.Tensor:
    """MuseTalk's ``AntiAliasInterpolation2d``: blur with ``σ = (1/s - 1)/2``, keep every
    ``1/s``-th pixel (identity at ``s = 1``)."""
    if scale == 1.0:
        return x
    sigma = (1 / scale - 1) / 2
    size = 2 * round(sigma * 4) + 1
    ka = size // 2
    kb = ka - 1 if size % 2 == 0 else ka
    coords = torch.arange(size, dtype=x.dtype, device=x.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    weight = kernel.expand(x.shape[1], 1, size, size)
    out = F.conv2d(F.pad(x, (ka, kb, ka, kb)), weight, groups=x.shape[1])
    step = int(1 / scale)
    return out[:, :, ::step, ::step]


class FrozenModels:
    """The VAE decoder and perceptual / sync networks, loaded on first use."""

    def __init__(self, assets: TrainingAssets):
        self.assets = assets
        self._cache: dict[str, torch.nn.Module] = {}

    def _get(self, name: str, device: torch.device) -> torch.nn.Module:
        if name not in self._cache:
            if name == "vae":
                if not self.assets.vae:
                    raise ValueError("pixel losses need the features' VAE (TrainingAssets.vae)")
                model = load_vae(self.assets.vae, device=device)
            else:
                path = self.assets.models.get(name)
                if path is None:
                    raise ValueError(f"loss needs the {name!r} model (TrainingAssets.models)")
                if name == "vgg19":
                    model = load_vgg19(path)
                elif name == "lpips":
                    model = load_lpips(path, "vgg")
                else:
                    model = load_stable_syncnet(path)
            self._cache[name] = model.to(device).eval().requires_grad_(False)
        return self._cache[name]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Differentiable ``(N, C, h, w)`` normalised latents → RGB ``(N, 3, H, W)`` in [-1, 1]."""
        vae = self._get("vae", latents.device)
        z = latents.float()
        if is_flux2(vae):
            mean, std = _bn_stats(vae, z)
            z = _unpatchify(z * std + mean)
        else:
            scale, shift = latent_factors(vae)
            z = z / scale + shift
        return vae.decode(z.to(next(vae.parameters()).dtype)).sample.float()

    def vgg_pyramid(
        self, pred: torch.Tensor, target: torch.Tensor, weights, scales, size: int
    ) -> torch.Tensor:
        vgg = self._get("vgg19", pred.device)
        a = F.interpolate((pred + 1) / 2, size=(size, size), mode="bilinear", align_corners=False)
        b = F.interpolate((target + 1) / 2, size=(size, size), mode="bilinear", align_corners=False)
        total = pred.new_zeros(())
        for s in scales:
            fa, fb = vgg(_gaussian_pyramid_level(a, s)), vgg(_gaussian_pyramid_level(b, s))
            for w, xa, xb in zip(weights, fa, fb, strict=True):
                total = total + w * (xa - xb.detach()).abs().mean()
        return total / sum(weights)

    def lpips(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._get("lpips", pred.device)(pred, target).mean()

    def sync(self, pred: torch.Tensor, mel: torch.Tensor, frames: int) -> torch.Tensor:
        """Mean sync loss of ``pred`` ``(N·F, 3, H, W)`` against mels ``(N, 1, 80, M)``."""
        net = self._get("syncnet", pred.device)
        if net.num_frames != frames:
            raise ValueError(f"the SyncNet scores {net.num_frames} frames, samples have {frames}")
        res = net.resolution
        if pred.shape[-2:] != (res, res):
            pred = F.interpolate(pred, size=(res, res), mode="bicubic", align_corners=False)
        lower = pred[:, :, res // 2 :, :]
        stacked = lower.reshape(-1, frames * 3, res - res // 2, res)
        v, a = net(stacked, mel.to(pred.dtype))
        return sync_loss(v, a).mean()
