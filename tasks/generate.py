"""Generate stage: re-synthesise each held-out clip's face crops from the trained checkpoint.

Family-agnostic. The checkpoint record names its model family; the family
(:mod:`generators.registry`) rebuilds the network from the record's spec JSON, prepares
the clip's conditioning from the feature files it declares (and the Engram bank when it
uses one) and predicts VAE latents per frame batch. Per held-out clip this is
self-reconstruction with the clip's own audio, the setting in which PSNR/SSIM against the
ground truth mean something. Predicted latents are decoded by **the VAE that produced the
latents** (the path recorded in the ``vae_latents`` feature file's fingerprint, loaded
through ``models.vae.load_vae``) and streamed into ``generated.mp4`` at the clip's frame
rate with **the audio the features were computed from** (``ClipFeatures.audio``: the
quality stage's re-aligned wav when it re-aligned the clip) muxed in.

Loaded models are cached on the stage instance by checkpoint / VAE / bank hash: a worker
loads each once, not once per clip.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from generators import registry
from generators.blocks.engram_hash import read_bank
from generators.family import ModelFamily, ModelSpec
from generators.io import read_tensor
from models.registry import ModelUnavailableError
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


class GenerateConfig(StageConfig):
    batch_size: int = Field(16, ge=1, description="frames per UNet / VAE call")
    crf: int = Field(17, ge=0, le=51, description="x264 quality of generated.mp4")
    reference_frame: int = Field(0, ge=0, description="clip frame used as identity reference")


class GenerateStage(Stage[GenerateConfig]):
    """Held-out clips only: ``generated.mp4`` (face crops + the clip's audio)."""

    name: ClassVar[str] = "generate"
    code_version: ClassVar[str] = "2"  # 2: family registry; the features' audio is muxed
    requires: ClassVar[tuple[str, ...]] = ("download", "faces", "features", "engram", "train")
    config_type: ClassVar[type[StageConfig]] = GenerateConfig

    def __init__(self, config: GenerateConfig, env: StageEnv):
        super().__init__(config, env)
        self.device = torch.device("cpu")
        self._models: dict[str, tuple[ModelFamily, ModelSpec, torch.nn.Module]] = {}
        self._vaes: dict[str, Any] = {}
        self._banks: dict[str, dict[str, torch.Tensor]] = {}

    def accepts(self, item_id: str, shared: dict[str, Record]) -> bool:
        return is_heldout(item_id, self.env)

    def setup(self) -> None:
        want_gpu = self.config.resources.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if want_gpu else "cpu")

    def teardown(self) -> None:
        self._models.clear()
        self._vaes.clear()
        self._banks.clear()

    # ------------------------------------------------------------------ cached models

    def _model(
        self, ckpt: TrainedCheckpoint, ctx: ItemContext
    ) -> tuple[ModelFamily, ModelSpec, torch.nn.Module]:
        key = ckpt.checkpoint.sha256
        if key not in self._models:
            try:
                family = registry.get(ckpt.family)()
                spec = family.parse_spec(ckpt.model_config_json)
                model = family.load_model(ctx.local_path(ckpt.checkpoint), spec).to(self.device)
            except Exception as exc:  # unknown family, bad spec JSON, bad safetensors, keys
                raise ItemFailure(
                    FailureKind.MODEL, f"generate: cannot load the {ckpt.family} model: {exc}"
                ) from exc
            self._models[key] = (family, spec, model)
        return self._models[key]

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
        ckpt = inputs.get("train", TrainedCheckpoint)

        family, spec, model = self._model(ckpt, ctx)
        try:
            files = {f: feats.file(f) for f in family.features}
        except KeyError as exc:
            raise ItemFailure(FailureKind.FORMAT, f"generate: {exc.args[0]}") from exc
        vae = self._vae(feats)
        bank = None
        if family.uses_memory_bank:
            bank = self._bank(inputs.get("engram", MemoryBank), ctx)
        try:
            tensors = {
                f: read_tensor(ctx.local_path(ff.artifact), family.features[f])
                for f, ff in files.items()
            }
        except Exception as exc:  # safetensors raises several types for bad files
            raise ItemFailure(FailureKind.FORMAT, f"generate: unreadable features: {exc}") from exc
        lengths = {f: int(t.shape[0]) if t.ndim else 0 for f, t in tensors.items()}
        if len(set(lengths.values())) != 1 or 0 in lengths.values():
            raise ItemFailure(FailureKind.MISALIGNED, f"{feats.clip_id}: frames {lengths}")
        try:
            prepared = family.prepare_clip(spec, tensors, bank, cfg.reference_frame)
        except ValueError as exc:
            raise ItemFailure(FailureKind.MODEL, f"{feats.clip_id}: {exc}") from exc
        num_frames = lengths["vae_latents"]
        h, w = tensors["vae_latents"].shape[-2:]

        fps = float(face.fps or clip.fps)
        out = ctx.scratch / "generated.mp4"
        wav = ctx.local_path(feats.audio)
        size_h, size_w = h * 8, w * 8
        with (
            torch.inference_mode(),
            VideoWriter(out, size_w, size_h, fps, audio=wav, crf=cfg.crf) as vw,
        ):
            for start in range(0, num_frames, cfg.batch_size):
                idx = torch.arange(start, min(start + cfg.batch_size, num_frames))
                pred = family.sample(model, prepared, idx)
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
