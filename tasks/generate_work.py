"""The generate stage's worker side: models loaded on one device, and the per-video work.

:class:`GenerateWorker` is what :meth:`tasks.generate.GenerateStage.setup` builds (the
stage's planning imports none of this: torch, the model families, the VAE). It keeps every
loaded model, VAE and memory bank for the worker's lifetime (one load each) and makes one
video per call of :meth:`GenerateWorker.video`: the family's inputs read from the clip's
feature files (the audio ones from the driving clip), the video key, then either the
committed video of that key or a fresh one (``prepare_clip``, ``sample`` per frame range,
the features' own VAE decode, streamed into an mp4 with the driving wav).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from generators import registry
from generators.blocks.engram_hash import read_bank
from generators.family import ModelFamily
from generators.family_config import DataLayout
from generators.io import read_tensor
from models.registry import ModelUnavailableError, ensure_model
from models.vae import decode_latents, latent_stride, load_vae
from tasks.base import FailureKind, ItemContext, ItemFailure, ItemInputs, stable_hash
from tasks.features_config import AUDIO_FEATURES
from tasks.generate_config import GenerateConfig
from tasks.media import VideoWriter
from tasks.records import ClipFeatures, GeneratedVideo, MemoryBank

if TYPE_CHECKING:
    from tasks.generate import Generator


class GenerateWorker:
    """One worker's loaded models and the per-video work of the generate stage.

    ``stage`` and ``code_version`` are the stage's name and code version: a video is
    committed under the stage, keyed by a hash that includes the code version.
    """

    def __init__(self, config: GenerateConfig, data_root: Path, stage: str, code_version: str):
        self.config = config
        self.data_root = data_root
        self.stage = stage
        self.code_version = code_version
        want_gpu = config.resources.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if want_gpu else "cpu")
        self._models: dict[str, tuple[ModelFamily, Any, torch.nn.Module]] = {}
        self._vaes: dict[str, Any] = {}
        self._banks: dict[str, dict[str, torch.Tensor]] = {}

    def video(
        self,
        inputs: ItemInputs,
        ctx: ItemContext,
        gen: Generator,
        setting: Literal["self", "cross"],
        feats: ClipFeatures,
        driver: ClipFeatures,
        fps: float,
    ) -> GeneratedVideo:
        """One video of ``gen`` in ``setting`` (``driver``'s audio), from the store when a
        video of the same key is there, else sampled, decoded and committed."""
        cfg = self.config
        try:
            family_cls = registry.get(gen.family)
        except KeyError as exc:
            raise ItemFailure(FailureKind.MODEL, f"{gen.label}: {exc.args[0]}") from exc
        if gen.checkpoint is not None and not ctx.store.exists(gen.checkpoint.checkpoint.uri):
            raise ItemFailure(FailureKind.MODEL, f"checkpoint file of {gen.label} is gone")
        layout = DataLayout(
            shapes={
                f.family: list(f.shape if f.family in family_cls.clip_features else f.shape[1:])
                for f in feats.files
            }
        )
        family, spec, model = self._model(gen, layout, ctx)
        # per spec: an official baseline may read no bank where the family's checkpoints do
        use_bank = family.uses_memory_bank_for(spec)
        bank_rec = inputs.get("engram", MemoryBank) if use_bank else None
        tensors, hashes = self._tensors(family, spec, feats, driver, ctx)
        num_frames = next(
            int(t.shape[0]) for f, t in tensors.items()
            if "/" not in f and f not in family.clip_features | family.row_features
        )  # fmt: skip
        params = cfg.model_dump(mode="json", include={"batch_size", "crf", "reference_frame"})
        video_key = stable_hash(
            {"code": self.code_version, "params": params, "weights": gen.sha256,
             "setting": setting, "inputs": hashes, "audio": driver.audio.sha256,
             "bank": bank_rec.bank.sha256 if bank_rec else ""}
        )  # fmt: skip
        name = f"{setting}-{gen.sha256[:16]}.mp4"
        audio = driver.audio
        ref = ctx.store.describe(self.stage, feats.clip_id, video_key, name, "video")
        if ref is not None:
            ctx.record_existing(ref)
        else:
            bank = self._bank(bank_rec, ctx) if bank_rec is not None else None
            try:
                prepared = family.prepare_clip(spec, tensors, bank, cfg.reference_frame)
            except ValueError as exc:
                raise ItemFailure(FailureKind.MODEL, f"{feats.clip_id}: {exc}") from exc
            out = ctx.scratch / name
            self._render(
                family, model, prepared, num_frames, feats, ctx.local_path(audio), out, fps
            )
            ref = ctx.commit(out, name, kind="video", owner=(feats.clip_id, video_key))
        return GeneratedVideo(
            family=gen.family,
            checkpoint=gen.label,
            checkpoint_sha256=gen.sha256,
            generator_origin=gen.origin,
            setting=setting,
            audio_clip_id=driver.clip_id,
            audio=audio,
            video=ref,
            num_frames=num_frames,
        )

    # ------------------------------------------------------------------ loading

    def _model(
        self, gen: Generator, layout: DataLayout, ctx: ItemContext
    ) -> tuple[ModelFamily, Any, torch.nn.Module]:
        key = f"{gen.sha256}:{layout.model_dump_json()}" if gen.baseline else gen.sha256
        if key not in self._models:
            try:
                family = registry.get(gen.family)()
                if gen.checkpoint is not None:
                    spec = family.parse_spec(gen.checkpoint.model_config_json)
                    model = family.load_model(ctx.local_path(gen.checkpoint.checkpoint), spec)
                else:
                    assert gen.baseline is not None
                    path = ensure_model(gen.baseline.weights, self.data_root)
                    spec, model = family.load_official(path, layout)  # type: ignore[attr-defined]
            except Exception as exc:  # unknown family, bad spec JSON, bad weights, no loader
                raise ItemFailure(
                    FailureKind.MODEL, f"cannot load the {gen.family} model {gen.label}: {exc}"
                ) from exc
            self._models[key] = (family, spec, model.to(self.device).eval())
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

    # ------------------------------------------------------------------ sampling

    def _tensors(
        self, family: ModelFamily, spec: Any, feats: ClipFeatures, driver: ClipFeatures,
        ctx: ItemContext,
    ) -> tuple[dict[str, torch.Tensor], list[str]]:  # fmt: skip
        """The family's inputs (audio ones from ``driver``), per-frame ones cut to one length,
        and the sha256 of every file read."""
        wanted = family.features_for(spec)
        extra = family.extra_tensors_for(spec)
        tensors: dict[str, torch.Tensor] = {}
        hashes: list[str] = []
        try:
            for f, name in sorted(wanted.items()):
                source = driver if f in AUDIO_FEATURES else feats
                ff = source.file(f)
                path = ctx.local_path(ff.artifact)
                hashes.append(ff.artifact.sha256)
                tensors[f] = read_tensor(path, name)
                for t in extra.get(f, ()):
                    tensors[f"{f}/{t}"] = read_tensor(path, t)
        except KeyError as exc:
            raise ItemFailure(FailureKind.FORMAT, f"generate: {exc.args[0]}") from exc
        except Exception as exc:  # safetensors raises several types for bad files
            raise ItemFailure(FailureKind.FORMAT, f"generate: unreadable features: {exc}") from exc
        per_frame = [f for f in wanted if f not in family.clip_features | family.row_features]
        lengths = {f: int(tensors[f].shape[0]) if tensors[f].ndim else 0 for f in per_frame}
        own = {n for f, n in lengths.items() if f not in AUDIO_FEATURES}
        heard = {n for f, n in lengths.items() if f in AUDIO_FEATURES}
        if 0 in lengths.values() or len(own) > 1 or len(heard) > 1:
            raise ItemFailure(FailureKind.MISALIGNED, f"{feats.clip_id}: frames {lengths}")
        if driver is feats and own != heard and own and heard:
            raise ItemFailure(FailureKind.MISALIGNED, f"{feats.clip_id}: frames {lengths}")
        n = min(lengths.values(), default=0)
        for f in per_frame:
            full = tensors[f].shape[0]
            tensors[f] = tensors[f][:n]
            for t in extra.get(f, ()):
                key = f"{f}/{t}"
                if tensors[key].ndim and tensors[key].shape[0] == full:
                    tensors[key] = tensors[key][:n]
        return tensors, hashes

    def _render(
        self,
        family: ModelFamily,
        model: torch.nn.Module,
        prepared: Any,
        num_frames: int,
        feats: ClipFeatures,
        wav: Path,
        out: Path,
        fps: float,
    ) -> None:
        """Sample consecutive frame ranges in order, decode, stream into ``out`` with ``wav``."""
        vae = self._vae(feats)
        stride = latent_stride(vae)
        batch = self.config.batch_size
        writer: VideoWriter | None = None
        try:
            with torch.inference_mode():
                for start in range(0, num_frames, batch):
                    idx = torch.arange(start, min(start + batch, num_frames))
                    pred = family.sample(model, prepared, idx)
                    frames = decode_latents(vae, pred.float().cpu(), batch_size=batch)
                    expected = (pred.shape[-2] * stride, pred.shape[-1] * stride)
                    if frames.shape[1:3] != expected:
                        raise ItemFailure(
                            FailureKind.MODEL,
                            f"generate: VAE decodes {frames.shape[1:3]}, expected {expected}",
                        )
                    if writer is None:
                        h, w = frames.shape[1:3]
                        writer = VideoWriter(out, w, h, fps, audio=wav, crf=self.config.crf)
                    writer.write(frames)
        except BaseException:
            if writer is not None:
                writer.abandon()
            raise
        if writer is not None:
            writer.close()
