"""The ``musetalk2`` family: MuseTalk 2.0 — one-step pixel-MeanFlow latent inpainting UNet.

Training (per micro-step, everything random from ``(seed, step)``): samples of
``n_sample_frames`` consecutive frames with IFS references and (stage 2) DMS mask edges;
the network's ``"pmf"`` forward returns the pMF objective and ``x̂``; the step adds the L1 /
perceptual / sync terms through the frozen models and the DSA indexer KL. Weights per stage
come from the config's presets (:mod:`generators.musetalk2.config`).

Sampling: one step, ``x̂ = net(z_1 = ε, r = 0, t = 1)`` (the u-head), ``ε`` drawn per frame
from the frame's index (so a frame's output does not depend on how frames are batched),
frames grouped into samples of ``n_sample_frames`` consecutive frames for the temporal
modules; references by IFS on the clip's pose / mouth features when the spec uses IFS and
they are given, else the generate stage's ``reference_frame``; the mask edge at the DMS
mean margin.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from generators.blocks.engram import engram_rows
from generators.blocks.engram_hash import assign_codes, read_bank
from generators.family import Batch, ModelFamily, unwrap
from generators.family_config import DataLayout, FamilyConfig, FeatureClip, ModelSpec
from generators.io import read_metadata
from generators.musetalk2.config import (
    FAMILY,
    PHASE_TRAINABLE,
    Musetalk2Config,
    Musetalk2Spec,
    engram_config,
    make_spec,
)
from generators.musetalk2.data import (
    CTC_TOKENS,
    FRAME_INDEX,
    HUBERT,
    LATENTS,
    SENSEVOICE,
    TENSORS,
    ClipData,
    TrainingData,
    check_bank,
    conditioning,
    ctc_codes,
    engram_keys,
    head_pose,
    make_batch,
    mouth_shape,
    needed_extra,
    needed_features,
    read_clip,
    step_noise,
)
from generators.musetalk2.losses import FrozenModels
from generators.musetalk2.network import Musetalk2Net
from generators.musetalk2.sampling import ClipMeta, edge_shift_rows, pick_reference, step_picks
from generators.musetalk2.transfer import transfer_from_official, transfer_from_parent
from generators.registry import register
from models.musetalk15_official import FAMILY as OFFICIAL_15


def freeze_for_stage(net: torch.nn.Module, stage: str) -> list[str]:
    """Set ``requires_grad`` per :data:`PHASE_TRAINABLE`; returns the trainable names."""
    patterns = [re.compile(p) for p in PHASE_TRAINABLE.get(stage, (".*",))]
    names = []
    for name, p in net.named_parameters():
        p.requires_grad_(any(pat.fullmatch(name) for pat in patterns))
        if p.requires_grad:
            names.append(name)
    return names


@dataclass
class PreparedClip:
    clip: ClipData
    codes: np.ndarray | None  # Engram audio code per frame
    references: torch.Tensor  # (T,) reference frame per target frame
    mask_rows: int
    rows: torch.Tensor | None = None  # Engram rows under the model's hashing (first sample)


@register
class Musetalk2Family(ModelFamily[Musetalk2Config, Musetalk2Spec]):
    name: ClassVar[str] = FAMILY
    config_type: ClassVar[type[FamilyConfig]] = Musetalk2Config
    spec_type: ClassVar[type[ModelSpec]] = Musetalk2Spec
    features: ClassVar[dict[str, str]] = dict(TENSORS)  # the most any spec reads
    uses_memory_bank: ClassVar[bool] = True
    row_features: ClassVar[frozenset[str]] = frozenset({SENSEVOICE})
    extra_tensors: ClassVar[dict[str, tuple[str, ...]]] = {SENSEVOICE: (FRAME_INDEX, CTC_TOKENS)}

    def __init__(self, config: Musetalk2Config | None = None):
        super().__init__(config)
        c = self.config
        self.features = self.features_for(c)
        self.uses_memory_bank = self.uses_memory_bank_for(c)
        self.extra_tensors = self.extra_tensors_for(c)
        self.last_transfer: dict[str, int] | None = None
        self._frozen: FrozenModels | None = None

    # a spec and a config carry the same audio / engram / sampling fields
    def features_for(self, spec: Musetalk2Spec | Musetalk2Config) -> dict[str, str]:
        return needed_features(spec.audio, engram_keys(spec), spec.sampling.reference == "ifs")

    def extra_tensors_for(
        self, spec: Musetalk2Spec | Musetalk2Config
    ) -> dict[str, tuple[str, ...]]:
        return needed_extra(spec.audio, engram_keys(spec))

    def uses_memory_bank_for(self, spec: Musetalk2Spec | Musetalk2Config) -> bool:
        return engram_keys(spec) == "kmeans"

    # ------------------------------------------------------------------ spec and model

    def make_spec(self, layout: DataLayout) -> Musetalk2Spec:
        return make_spec(self.config, layout.shapes)

    def build(self, spec: Musetalk2Spec) -> torch.nn.Module:
        net = Musetalk2Net(spec)
        freeze_for_stage(net, spec.training_stage)
        return net

    def describe(self, spec: Musetalk2Spec) -> str:
        on = [n for n in ("mhc", "engram", "gated_attention", "dsa") if getattr(spec, n).enabled]
        widths = spec.unet_config["block_out_channels"]
        return f"{spec.training_stage} unet={widths} frames={spec.n_sample_frames} on={on}"

    def init_from_parent(
        self,
        model: torch.nn.Module,
        spec: Musetalk2Spec,
        parent_weights: Path,
        parent_spec_json: str,
    ) -> None:
        meta = read_metadata(parent_weights)
        if meta.get("family", FAMILY) != FAMILY:
            raise ValueError(f"parent checkpoint is {meta['family']!r}, not {FAMILY!r}")
        report = transfer_from_parent(unwrap(model), load_file(str(parent_weights)))
        self.last_transfer = report.counts()

    def transfer_weights(
        self, model: torch.nn.Module, spec: Musetalk2Spec, weights: Path, source_family: str
    ) -> dict[str, int]:
        if source_family != OFFICIAL_15:
            raise ValueError(f"musetalk2 transfers from {OFFICIAL_15!r}, not {source_family!r}")
        self.last_transfer = transfer_from_official(unwrap(model), weights).counts()
        return self.last_transfer

    # ------------------------------------------------------------------ training

    def needs_vae_decoder(self) -> bool:
        w = self.config.losses
        return max(w.l1_pixel, w.vgg, w.lpips, w.sync) > 0

    def prepare_model(self, model: torch.nn.Module, spec: Musetalk2Spec, data: Any) -> None:
        """Engram tables start from the memory bank (see :mod:`generators.blocks.engram`);
        with CTC keys there is none: the module keeps its own init and hashing."""
        if data.bank is None:
            return
        for module in unwrap(model).levels.engram.values():
            module.init_from_bank(data.bank)

    def load_training_data(
        self, spec: Musetalk2Spec, clips: list[FeatureClip], bank_path: str | None
    ) -> TrainingData:
        bank = None
        if self.uses_memory_bank_for(spec):
            if bank_path is None:
                raise ValueError("musetalk2 with Engram trains with a memory bank")
            bank = read_bank(bank_path)
            check_bank(bank, engram_config(spec))
        columns = math.ceil(spec.n_sample_frames * 16 / 5) if self.config.losses.sync > 0 else None
        loaded = [read_clip(c, spec, bank, columns) for c in clips]
        return TrainingData(spec, loaded, bank, self.config.pmf, columns)

    def training_batch(
        self, data: TrainingData, seed: int, step: int, global_batch: int, start: int, stop: int
    ) -> Batch:
        spec = data.spec
        frames = spec.n_sample_frames
        metas = [c.meta for c in data.clips]
        height_px = spec.latent_height * spec.latent_stride
        picks = step_picks(
            metas, frames, spec.sampling, height_px, spec.latent_stride, seed, step, global_batch
        )
        shape = (spec.latent_channels, spec.latent_height, spec.latent_width)
        noise, t, r = step_noise(seed, step, global_batch, frames, shape, data.pmf)
        rows = slice(start * frames, stop * frames)
        return make_batch(data, picks[start:stop], noise[rows], t[rows], r[rows])

    def _models(self) -> FrozenModels:
        if self._frozen is None or self._frozen.assets is not self.assets:
            self._frozen = FrozenModels(self.assets)
        return self._frozen

    def training_step(self, model: torch.nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        spec: Musetalk2Spec = unwrap(model).spec
        w, cfg = self.config.losses, self.config
        out = model(batch, mode="pmf", pmf=cfg.pmf)
        x_pred, target = out["x_pred"], batch["target"]
        terms = {"pmf": out["pmf"], "pmf_raw_u": out["pmf_raw_u"].detach()}
        terms["l1_latent"] = (x_pred - target).abs().mean()
        loss = w.pmf * terms["pmf"] + w.l1_latent * terms["l1_latent"]
        if spec.dsa.enabled:
            terms["indexer_kl"] = out["aux"]
            loss = loss + w.indexer * out["aux"]
        keep = batch["t"] <= w.pixel_max_t
        if self.needs_vae_decoder() and bool(keep.any()):
            frozen = self._models()
            pred = frozen.decode(x_pred[keep])
            with torch.no_grad():
                real = frozen.decode(target[keep])
            pixel = {"l1_pixel": lambda: F.l1_loss(pred, real)}
            p = cfg.perceptual_options
            pixel["vgg"] = lambda: frozen.vgg_pyramid(
                pred, real, p.vgg_layer_weights, p.pyramid_scales, p.input_size
            )
            pixel["lpips"] = lambda: frozen.lpips(pred, real)
            frames = spec.n_sample_frames
            whole = keep.view(-1, frames)[:, 0]
            pixel["sync"] = lambda: frozen.sync(pred, batch["mel"][whole], frames)
            for name, term in pixel.items():
                weight = getattr(w, name)
                if weight > 0:
                    terms[name] = term()
                    loss = loss + weight * terms[name]
        return {"loss": loss, **terms}

    # ------------------------------------------------------------------ sampling

    def prepare_clip(
        self,
        spec: Musetalk2Spec,
        features: dict[str, torch.Tensor],
        bank: dict[str, torch.Tensor] | None,
        reference_frame: int,
    ) -> PreparedClip:
        lat = features[LATENTS]
        want = (spec.latent_channels, spec.latent_height, spec.latent_width)
        if lat.ndim != 4 or tuple(lat.shape[1:]) != want or lat.shape[0] == 0:
            raise ValueError(f"latents {tuple(lat.shape)} do not fit the checkpoint's {want}")
        audio = features[spec.audio]
        index = features.get(f"{SENSEVOICE}/{FRAME_INDEX}") if spec.audio == SENSEVOICE else None
        if spec.audio == SENSEVOICE and index is None:
            raise ValueError("sensevoice audio needs sensevoice/frame_index")
        if audio.shape[-1] != spec.audio_dim:
            raise ValueError(f"audio width {audio.shape[-1]}, checkpoint wants {spec.audio_dim}")
        frames = min(len(lat), len(index) if index is not None else len(audio))
        codes = None
        if engram_keys(spec) == "ctc":
            tokens = features.get(f"{SENSEVOICE}/{CTC_TOKENS}")
            if tokens is None:
                raise ValueError("Engram with CTC keys needs sensevoice/ctc_tokens")
            codes = ctc_codes(tokens, frames, engram_config(spec), "sampling")
        elif engram_keys(spec) == "kmeans":
            if bank is None:
                raise ValueError("this checkpoint samples with the Engram memory bank")
            codes = assign_codes(bank["codebook"], features[HUBERT][:frames].float().numpy())
        pose = mouth = None
        if spec.sampling.reference == "ifs" and "liveportrait_motion" in features:
            pose = head_pose(features["liveportrait_motion"][:frames].float())
            mouth = mouth_shape(features["emoca_flame"][:frames].float())
        meta = ClipMeta(frames, 1.0, pose, mouth, frames - 1)
        if pose is not None:
            refs = [
                pick_reference(meta, t, spec.sampling, np.random.default_rng([0, t]))
                for t in range(frames)
            ]
        else:
            refs = [min(reference_frame, frames - 1)] * frames
        dms = spec.sampling.dms
        height_px = spec.latent_height * spec.latent_stride
        shift = edge_shift_rows(dms.mean_px, height_px, spec.latent_stride) if dms.enabled else 0
        clip = ClipData(
            "clip", lat[:frames].to(torch.float16), audio, index, None, None, 25.0, meta
        )
        return PreparedClip(clip, codes, torch.tensor(refs), round(shift))

    def sample(
        self, model: torch.nn.Module, clip: PreparedClip, frames: torch.Tensor
    ) -> torch.Tensor:
        net = unwrap(model)
        spec: Musetalk2Spec = net.spec
        device = next(net.parameters()).device
        if clip.codes is not None and clip.rows is None:
            module = next(iter(net.levels.engram.values()))
            clip.rows = torch.from_numpy(
                engram_rows(
                    clip.codes,
                    module.multipliers.cpu().numpy(),
                    module.primes.cpu().numpy(),
                    module.offsets.cpu().numpy(),
                    engram_config(spec),
                )
            )
        clip.clip.rows = clip.rows
        outs = []
        for chunk in frames.long().split(spec.n_sample_frames):
            rows = torch.full((len(chunk),), clip.mask_rows)
            inputs = conditioning(clip.clip, chunk, clip.references[chunk], rows, spec.audio_window)
            inputs["noise"] = torch.stack([frame_noise(spec, int(i)) for i in chunk])
            inputs = {k: v.to(device) for k, v in inputs.items()}
            inputs["frames"] = torch.tensor(len(chunk))
            outs.append(model(inputs, mode="sample")["x"])
        return torch.cat(outs)


def frame_noise(spec: Musetalk2Spec, frame: int) -> torch.Tensor:
    """``z_1`` of one frame, from its index alone."""
    gen = torch.Generator().manual_seed(frame)
    shape = (spec.latent_channels, spec.latent_height, spec.latent_width)
    return torch.randn(shape, generator=gen)
