"""Generate stage: re-synthesise each held-out clip's face crops from the trained UNet.

Per held-out clip (self-reconstruction with the clip's own audio, the setting in which
PSNR/SSIM against the ground truth mean something), every frame ``t`` is predicted from:

- the frame's ground-truth latents with the lower half (mouth) zeroed,
- the reference latents of one fixed frame of the clip (``reference_frame``, clamped),
- the Engram prior retrieved for the clip's own audio codes,
- the frame's HuBERT window,

exactly as in training (same functions from :mod:`models.unet` and
:mod:`tasks.train_data`). Predicted latents are decoded by **the VAE that produced the
latents** (the path recorded in the ``vae_latents`` feature file's fingerprint, loaded
through ``models.vae.load_vae``) and streamed into ``generated.mp4`` at the clip's frame
rate with its 16 kHz audio muxed in.

Loaded models are cached on the stage instance by checkpoint / VAE / bank hash: a worker
loads each once, not once per clip.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from models.registry import ModelUnavailableError
from models.unet import (
    LatentUNetSpec,
    audio_window_tokens,
    load_unet,
    predict_latents,
    unet_input,
)
from models.vae import decode_latents, load_vae
from tasks.base import (
    FailureKind,
    ItemContext,
    ItemFailure,
    ItemInputs,
    Record,
    Stage,
    StageConfig,
    StageEnv,
)
from tasks.media import VideoWriter
from tasks.records import (
    ClipFeatures,
    FaceTrack,
    GeneratedClip,
    MemoryBank,
    NormalizedClip,
    TrainedCheckpoint,
)
from tasks.split import is_heldout
from tasks.train_data import engram_prior, read_bank, read_tensor


class GenerateConfig(StageConfig):
    batch_size: int = Field(16, ge=1, description="frames per UNet / VAE call")
    crf: int = Field(17, ge=0, le=51, description="x264 quality of generated.mp4")
    reference_frame: int = Field(0, ge=0, description="clip frame used as identity reference")


class GenerateStage(Stage[GenerateConfig]):
    """Held-out clips only: ``generated.mp4`` (face crops + the clip's audio)."""

    name: ClassVar[str] = "generate"
    code_version: ClassVar[str] = "1"
    requires: ClassVar[tuple[str, ...]] = ("download", "faces", "features", "engram", "train")
    config_type: ClassVar[type[StageConfig]] = GenerateConfig

    def __init__(self, config: GenerateConfig, env: StageEnv):
        super().__init__(config, env)
        self.device = torch.device("cpu")
        self._unets: dict[str, tuple[LatentUNetSpec, torch.nn.Module]] = {}
        self._vaes: dict[str, Any] = {}
        self._banks: dict[str, dict[str, torch.Tensor]] = {}

    def accepts(self, item_id: str, shared: dict[str, Record]) -> bool:
        return is_heldout(item_id, self.env)

    def setup(self) -> None:
        want_gpu = self.config.resources.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if want_gpu else "cpu")

    def teardown(self) -> None:
        self._unets.clear()
        self._vaes.clear()
        self._banks.clear()

    # ------------------------------------------------------------------ cached models

    def _unet(self, ckpt: TrainedCheckpoint, ctx: ItemContext) -> tuple[LatentUNetSpec, Any]:
        key = ckpt.checkpoint.sha256
        if key not in self._unets:
            try:
                spec = LatentUNetSpec.from_json(ckpt.model_config_json)
                unet = load_unet(ctx.local_path(ckpt.checkpoint), spec).to(self.device)
            except Exception as exc:  # bad spec JSON, bad safetensors, mismatched keys
                raise ItemFailure(FailureKind.MODEL, f"generate: cannot load UNet: {exc}") from exc
            self._unets[key] = (spec, unet)
        return self._unets[key]

    def _vae(self, feats: ClipFeatures) -> Any:
        model = feats.file("vae_latents").model
        where = model.resolved_path or model.source
        key = f"{where}@{model.sha256}"
        if key not in self._vaes:
            try:
                self._vaes[key] = load_vae(where, device=self.device)  # fp32: Flux VAE upcasts
            except ModelUnavailableError as exc:
                raise ItemFailure(FailureKind.MODEL, f"generate: {exc}") from exc
        return self._vaes[key]

    def _bank(self, bank: MemoryBank, ctx: ItemContext) -> dict[str, torch.Tensor]:
        key = bank.bank.sha256
        if key not in self._banks:
            try:
                self._banks[key] = read_bank(ctx.local_path(bank.bank))
            except (ValueError, OSError) as exc:
                raise ItemFailure(FailureKind.MODEL, f"generate: bad memory bank: {exc}") from exc
        return self._banks[key]

    # ------------------------------------------------------------------ process

    def process(self, inputs: ItemInputs, ctx: ItemContext) -> GeneratedClip:
        cfg = self.config
        clip = inputs.get("download", NormalizedClip)
        face = inputs.get("faces", FaceTrack)
        feats = inputs.get("features", ClipFeatures)
        bank_rec = inputs.get("engram", MemoryBank)
        ckpt = inputs.get("train", TrainedCheckpoint)

        try:
            lat_file, hub_file = feats.file("vae_latents"), feats.file("hubert")
        except KeyError as exc:
            raise ItemFailure(FailureKind.FORMAT, f"generate: {exc.args[0]}") from exc
        spec, unet = self._unet(ckpt, ctx)
        vae = self._vae(feats)
        bank = self._bank(bank_rec, ctx)
        try:
            latents = read_tensor(ctx.local_path(lat_file.artifact), "latents")
            hubert = read_tensor(ctx.local_path(hub_file.artifact), "features")
        except Exception as exc:  # safetensors raises several types for bad files
            raise ItemFailure(FailureKind.FORMAT, f"generate: unreadable features: {exc}") from exc
        _check_shapes(spec, latents, hubert, feats.clip_id)
        num_frames, _, h, w = latents.shape
        try:
            prior = engram_prior(bank, hubert)
        except ValueError as exc:
            raise ItemFailure(FailureKind.MODEL, f"generate: bank does not fit: {exc}") from exc

        fps = float(face.fps or clip.fps)
        ref_idx = min(cfg.reference_frame, num_frames - 1)
        ref = latents[ref_idx : ref_idx + 1].float()
        out = ctx.scratch / "generated.mp4"
        wav = ctx.local_path(clip.audio)
        size_h, size_w = h * 8, w * 8
        with (
            torch.inference_mode(),
            VideoWriter(out, size_w, size_h, fps, audio=wav, crf=cfg.crf) as vw,
        ):
            for start in range(0, num_frames, cfg.batch_size):
                idx = torch.arange(start, min(start + cfg.batch_size, num_frames))
                target = latents[idx].float()
                x = unet_input(target, ref.expand(len(idx), -1, -1, -1), prior[idx])
                tokens = audio_window_tokens(hubert, idx, spec.audio_window_frames)
                pred = predict_latents(unet, x.to(self.device), tokens.to(self.device))
                frames = decode_latents(vae, pred.float().cpu(), batch_size=cfg.batch_size)
                if frames.shape[1:3] != (size_h, size_w):
                    raise ItemFailure(
                        FailureKind.MODEL,
                        f"generate: VAE decodes {frames.shape[1:3]}, expected {(size_h, size_w)}",
                    )
                vw.write(frames)
        ref_out = ctx.commit(out, "generated.mp4", kind="video")
        return GeneratedClip(
            clip_id=feats.clip_id,
            video=ref_out,
            num_frames=num_frames,
            fps=fps,
            crop_size_px=size_h,
        )


def _check_shapes(
    spec: LatentUNetSpec, latents: torch.Tensor, hubert: torch.Tensor, clip_id: str
) -> None:
    if latents.ndim != 4 or hubert.ndim != 3 or latents.shape[0] == 0:
        raise ItemFailure(
            FailureKind.FORMAT,
            f"{clip_id}: latents {tuple(latents.shape)} / hubert {tuple(hubert.shape)}",
        )
    if latents.shape[0] != hubert.shape[0]:
        raise ItemFailure(
            FailureKind.MISALIGNED,
            f"{clip_id}: {latents.shape[0]} latent frames vs {hubert.shape[0]} audio frames",
        )
    want_lat = (spec.latent_channels, spec.unet_config.get("sample_size"))
    want_aud = (spec.audio_steps_per_frame, spec.audio_dim)
    if (latents.shape[1], latents.shape[2]) != want_lat or tuple(hubert.shape[1:]) != want_aud:
        raise ItemFailure(
            FailureKind.MODEL,
            f"{clip_id}: features {tuple(latents.shape[1:])}/{tuple(hubert.shape[1:])} do not fit "
            f"the checkpoint (latents (C, h) {want_lat}, audio {want_aud})",
        )
