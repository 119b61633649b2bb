"""Features stage: per-frame video and audio features of every accepted clip.

Per accepted clip it writes one safetensors file per feature family, each a catalog
artifact carrying shape, dtype and the fingerprint of the weights that made it:

- ``vae_latents.safetensors``: tensor ``latents`` ``(T, C, H/8, W/8)`` (``latent_dtype``),
  normalised as the VAE family's pipelines do (``(mode - shift) * scale``), one row per
  decoded face-crop frame;
- ``liveportrait_motion.safetensors``: tensor ``motion`` ``(T, 133)`` (``motion: null``
  disables it) and ``emoca_flame.safetensors``: tensor ``flame`` ``(T, 159)`` (``flame:
  null`` disables it); both computed from the same decoded crop frames as the latents
  (see :mod:`tasks.features_video`);
- ``reference.safetensors``: DINOv2 ``cls`` ``(D,)``, ``patch_tokens`` ``(N, D)`` and the
  ``image`` of the clip's middle frame (``reference: null`` disables it);
- ``hubert.safetensors``: tensor ``features`` ``(T, 2, D)``, two HuBERT steps per video frame;
- ``sensevoice.safetensors``: ``features`` ``(T_s, 512)`` at ≈16.67 Hz (prompt rows dropped)
  and ``frame_index`` ``(T,)``: two SenseVoice steps per three video frames (rule in
  :mod:`tasks.features_audio`); language / emotion / event tags and the transcript go to
  the ``speech`` catalog table (``sensevoice: null`` disables it).

**Alignment rule.** HuBERT emits ``T_a = floor((N - 400) / 320) + 1`` steps for ``N`` samples
at 16 kHz; step ``k`` sees samples ``[320k, 320k + 400)`` (50 Hz). Video frame ``i`` of a
25 fps clip spans ``[40i, 40i + 40)`` ms and gets steps ``2i`` and ``2i + 1`` (their windows
are centred at ``40i + 12.5`` and ``40i + 32.5`` ms, both inside the frame). A clip of exactly
``T`` frames has ``N = 640T`` samples and hence ``T_a = 2T - 1``: the missing tail step(s)
(any index ``≥ T_a``) repeat the last step; surplus audio steps are dropped. The clip is
``MISALIGNED`` when ``|T_a · fps / 50 - T| > max_misalignment_frames`` (``|T_a/2 - T|`` at
25 fps). At any other frame rate the two steps of frame ``i`` sit at 50 Hz positions
``(2i + j) · 25 / fps`` (``j = 0, 1``), linearly interpolated and clamped to the last step,
which reduces exactly to the rule above at 25 fps.

Crops are decoded as a stream in chunks of ``resources.batch_size`` frames, so a clip is
never held in memory as pixels; long audio runs through HuBERT in overlapping windows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from safetensors.torch import save_file

from models.emoca import FLAME_LAYOUT
from models.hubert import (
    FRAME_RATE_HZ,
    SAMPLE_RATE_HZ,
    check_layer,
    extract_hubert_windowed,
    hubert_num_frames,
    load_hubert,
    make_feature_extractor,
)
from models.liveportrait import MOTION_LAYOUT
from models.registry import ModelSpec, ensure_model, fingerprint
from models.sensevoice import FRAME_RATE_HZ as FRAME_RATE_SV
from models.sensevoice import load_sensevoice
from models.vae import is_flux2, latent_factors, load_vae
from tasks.base import (
    FailureKind,
    ItemContext,
    ItemFailure,
    ItemInputs,
    ModelFingerprint,
    Stage,
    StageConfig,
)
from tasks.features_audio import run_sensevoice
from tasks.features_video import VideoExtractors
from tasks.media import read_wav
from tasks.records import ClipFeatures, FaceTrack, FeatureFile, NormalizedClip, SpeechTags

VAE_FAMILIES = ("vae-flux1", "vae-sd", "vae-flux2")
STEPS_PER_FRAME = 2


class FeaturesConfig(StageConfig):
    vae: ModelSpec = ModelSpec(family="vae-flux1", source="models/vae-flux1-tiny", tiny_random=True)
    hubert: ModelSpec = ModelSpec(family="hubert", source="models/hubert-tiny", tiny_random=True)
    hubert_layer: int = Field(-1, description="-1: model output; 0..L: hidden_states index")
    latent_dtype: Literal["float16", "float32"] = "float16"
    hubert_dtype: Literal["float16", "float32"] = "float16"
    max_misalignment_frames: int = Field(2, ge=0, description="allowed |audio - video| in frames")
    hubert_window_s: float = Field(20.0, gt=1.0, description="HuBERT window for long audio")
    hubert_context_s: float = Field(1.0, ge=0.0, description="extra audio each side of a window")
    motion: ModelSpec | None = ModelSpec(
        family="liveportrait-motion", source="models/liveportrait-motion-tiny", tiny_random=True
    )
    flame: ModelSpec | None = ModelSpec(
        family="emoca", source="models/emoca-tiny", tiny_random=True
    )
    sensevoice: ModelSpec | None = ModelSpec(
        family="sensevoice", source="models/sensevoice-tiny", tiny_random=True
    )
    reference: ModelSpec | None = ModelSpec(
        family="dinov2", source="models/dinov2-tiny", tiny_random=True
    )
    emoca_crop_fraction: float = Field(
        0.83, gt=0.2, le=1.0, description="central share of the face crop EMOCA sees"
    )

    @field_validator("vae")
    @classmethod
    def _vae_family(cls, v: ModelSpec) -> ModelSpec:
        if v.family not in VAE_FAMILIES:
            raise ValueError(f"vae.family must be one of {VAE_FAMILIES}, got {v.family!r}")
        return v

    @field_validator("hubert")
    @classmethod
    def _hubert_family(cls, v: ModelSpec) -> ModelSpec:
        if v.family != "hubert":
            raise ValueError(f"hubert.family must be 'hubert', got {v.family!r}")
        return v


def align_audio_steps(
    feats: np.ndarray, num_frames: int, fps: float, steps_per_frame: int = STEPS_PER_FRAME
) -> np.ndarray:
    """``(T_a, D)`` 50 Hz features → ``(num_frames, steps_per_frame, D)`` per video frame.

    See the module docstring for the rule; indices past the last step repeat it.
    """
    if feats.shape[0] == 0:
        raise ValueError("no audio steps to align")
    pos = np.arange(num_frames * steps_per_frame, dtype=np.float64)
    pos *= FRAME_RATE_HZ / (steps_per_frame * fps)
    pos = np.minimum(pos, feats.shape[0] - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, feats.shape[0] - 1)
    w = (pos - lo).astype(np.float32)[:, None]
    out = feats[lo] * (1.0 - w) + feats[hi] * w if np.any(w) else feats[lo]
    return out.reshape(num_frames, steps_per_frame, feats.shape[1]).astype(np.float32)


class FeaturesStage(Stage[FeaturesConfig]):
    """Face-crop VAE latents + frame-aligned HuBERT features for each accepted clip."""

    name: ClassVar[str] = "features"
    code_version: ClassVar[str] = "2"
    requires: ClassVar[tuple[str, ...]] = ("download", "faces", "quality")
    config_type: ClassVar[type[StageConfig]] = FeaturesConfig

    def model_specs(self) -> list[Any]:
        cfg = self.config
        specs = (cfg.vae, cfg.hubert, cfg.motion, cfg.flame, cfg.reference, cfg.sensevoice)
        return [s for s in specs if s is not None]

    def setup(self) -> None:
        root = Path(self.env.data_root)
        want_gpu = self.config.resources.num_gpus > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if want_gpu else "cpu")
        vae_spec, hub_spec = self.config.vae, self.config.hubert
        vae_path = ensure_model(vae_spec, root)
        # fp32 on purpose: the FLUX.1 VAE config sets force_upcast (fp16 overflows)
        self.vae = load_vae(
            vae_path or vae_spec.source,
            vae_spec.subfolder,
            self.device,
            torch.float32,
            revision=vae_spec.revision,
            family=vae_spec.family,
        )
        hub_path = ensure_model(hub_spec, root)
        self.hubert = load_hubert(
            hub_path or hub_spec.source,
            hub_spec.subfolder,
            self.device,
            revision=hub_spec.revision,
        )
        check_layer(self.hubert, self.config.hubert_layer)
        self.feature_extractor = make_feature_extractor()
        self.video = VideoExtractors.load(
            self.vae,
            self.config.motion,
            self.config.flame,
            self.config.reference,
            root,
            self.device,
            self.config.emoca_crop_fraction,
        )
        self.sensevoice = None
        if self.config.sensevoice is not None:
            sv_path = ensure_model(self.config.sensevoice, root)
            self.sensevoice = load_sensevoice(sv_path or self.config.sensevoice.source, self.device)
        self.fingerprints: dict[str, ModelFingerprint] = {
            s.family: self.env.model_fingerprints.get(s.family) or fingerprint(s, root)
            for s in self.model_specs()
        }

    def process(self, inputs: ItemInputs, ctx: ItemContext) -> ClipFeatures:
        clip = inputs.get("download", NormalizedClip)
        face = inputs.get("faces", FaceTrack)
        fps = float(face.fps or clip.fps)
        if fps <= 0:
            raise ItemFailure(FailureKind.BAD_METADATA, f"non-positive frame rate {fps}")
        reference_index = face.num_frames // 2
        video = self.video.run(
            ctx.local_path(face.crops), self.config.resources.batch_size, reference_index
        )
        t = video["vae_latents"].shape[0]
        if abs(t - face.num_frames) > self.config.max_misalignment_frames:
            raise ItemFailure(
                FailureKind.MISALIGNED,
                f"crops decode to {t} frames, faces stage reported {face.num_frames}",
            )
        verdict = inputs.records.get("quality")
        audio_ref = getattr(verdict, "aligned_audio", None) or clip.audio  # re-aligned wins
        wave, rate = read_wav(ctx.local_path(audio_ref))
        aligned = self._audio_features(wave, rate, t, fps)
        scale, shift = latent_factors(self.vae)
        cfg, prints = self.config, self.fingerprints
        common = {"clip_id": clip.clip_id, "fps": repr(fps), "num_frames": str(t)}
        latents = video["vae_latents"].to(getattr(torch, cfg.latent_dtype))
        hubert = torch.from_numpy(aligned).to(getattr(torch, cfg.hubert_dtype))
        files = [
            self._save_tensors(
                ctx, "vae_latents", {"latents": latents}, prints[cfg.vae.family], common, fps,
                _latent_meta(self.vae, scale, shift),
            ),
            self._save_tensors(
                ctx, "hubert", {"features": hubert}, prints[cfg.hubert.family], common, fps,
                {"layout": "T,2,D", "layer": str(cfg.hubert_layer),
                 "alignment": "frame i <- 50 Hz steps (2i, 2i+1) at 25 fps; tail repeats last"},
            ),
        ]  # fmt: skip
        if cfg.motion is not None:
            layout = ",".join(f"{name}:{size}" for name, size in MOTION_LAYOUT)
            files.append(
                self._save_tensors(
                    ctx, "liveportrait_motion", {"motion": video["liveportrait_motion"]},
                    prints[cfg.motion.family], common, fps,
                    {"layout": f"T,133 ({layout}); angles in degrees",
                     "input": "face crop resized to 256x256 RGB in [0, 1]"},
                )
            )  # fmt: skip
        if cfg.flame is not None:
            layout = ",".join(f"{name}:{size}" for name, size in FLAME_LAYOUT)
            files.append(
                self._save_tensors(
                    ctx, "emoca_flame", {"flame": video["emoca_flame"]},
                    prints[cfg.flame.family], common, fps,
                    {"layout": f"T,159 ({layout}); pose axis-angle",
                     "input": f"central {cfg.emoca_crop_fraction:g} of the face crop, "
                              "224x224 RGB in [0, 1]"},
                )
            )  # fmt: skip
        speech = None
        if cfg.sensevoice is not None and self.sensevoice is not None:
            sv = run_sensevoice(self.sensevoice, wave, t, fps, cfg.max_misalignment_frames)
            sv_fp = self.fingerprints[cfg.sensevoice.family]
            files.append(self._save_tensors(
                ctx, "sensevoice",
                {"features": torch.from_numpy(sv.features),
                 "frame_index": torch.from_numpy(sv.frame_index)},
                sv_fp, common, frame_rate_hz=FRAME_RATE_SV,
                meta={"layout": "features (T_s, 512) at 1000/60 Hz, prompt rows dropped; "
                                "frame_index (T,)",
                      "alignment": "video frame i <- step floor((2i + 1) / 3) at 25 fps",
                      "language": sv.language or "", "emotion": sv.emotion or "",
                      "event": sv.event or "", "transcript": sv.transcript},
            ))  # fmt: skip
            speech = SpeechTags(
                language=sv.language or "",
                emotion=sv.emotion or "",
                event=sv.event or "",
                transcript=sv.transcript,
                model_origin=sv_fp.origin,
            )
        if cfg.reference is not None:
            fp = self.fingerprints[cfg.reference.family]
            frame = min(reference_index, t - 1)
            files.append(self._save_tensors(
                ctx, "reference",
                {"patch_tokens": video["reference_patch_tokens"], "cls": video["reference_cls"],
                 "image": video["reference_image"]},
                fp, common, frame_rate_hz=0.0,
                meta={"frame_index": str(frame),
                      "layout": "cls (D), patch_tokens (N, D) row-major 14 px patches, "
                                "image (H, W, 3) uint8"},
            ))  # fmt: skip
        return ClipFeatures(clip_id=clip.clip_id, fps=fps, num_frames=t, files=files, speech=speech)

    def _save_tensors(
        self,
        ctx: ItemContext,
        family: str,
        tensors: dict[str, torch.Tensor],
        fp: ModelFingerprint,
        common: dict[str, str],
        frame_rate_hz: float,
        meta: dict[str, str],
    ) -> FeatureFile:
        """Several named tensors in one family file; the first one's shape and dtype describe it."""
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        path = ctx.scratch / f"{family}.safetensors"
        save_file(tensors, str(path), metadata={**common, **_fp_meta(fp), **meta})
        ref = ctx.commit(path, f"{family}.safetensors", kind="features")
        first = next(iter(tensors.values()))
        return FeatureFile(
            family=family,
            artifact=ref,
            shape=list(first.shape),
            dtype=str(first.dtype).removeprefix("torch."),
            frame_rate_hz=frame_rate_hz,
            model=fp,
        )

    def _audio_features(
        self, wave: np.ndarray, rate: int, num_frames: int, fps: float
    ) -> np.ndarray:
        if rate != SAMPLE_RATE_HZ:
            raise ItemFailure(FailureKind.FORMAT, f"audio is {rate} Hz, HuBERT needs 16000 Hz")
        steps = hubert_num_frames(len(wave))
        audio_frames = steps * fps / FRAME_RATE_HZ
        if abs(audio_frames - num_frames) > self.config.max_misalignment_frames:
            raise ItemFailure(
                FailureKind.MISALIGNED,
                f"audio gives {steps} HuBERT steps (~{audio_frames:.1f} frames at {fps:g} fps) "
                f"for {num_frames} video frames",
            )
        if steps == 0:
            raise ItemFailure(FailureKind.FORMAT, f"audio of {len(wave)} samples is too short")
        feats = extract_hubert_windowed(
            self.hubert,
            self.feature_extractor,
            wave,
            self.config.hubert_layer,
            window_steps=int(self.config.hubert_window_s * FRAME_RATE_HZ),
            context_steps=int(self.config.hubert_context_s * FRAME_RATE_HZ),
        )
        return align_audio_steps(feats, num_frames, fps)


def _latent_meta(vae: Any, scale: float, shift: float) -> dict[str, str]:
    """How the stored latents were normalised, so a reader can undo it."""
    if is_flux2(vae):
        return {
            "layout": "T,4C,H/16,W/16 (2x2 patchified, channel order c,dy,dx)",
            "normalisation": "(patchify(mode) - bn.running_mean) / sqrt(bn.running_var + eps)",
        }
    return {
        "layout": "T,C,H/8,W/8",
        "scaling_factor": repr(scale),
        "shift_factor": repr(shift),
        "normalisation": "(mode - shift) * scale",
    }


def _fp_meta(fp: ModelFingerprint) -> dict[str, str]:
    return {
        "model_name": fp.name,
        "model_source": fp.source,
        "model_sha256": fp.sha256,
        "model_origin": fp.origin,
        "model_fingerprint": json.dumps(fp.model_dump(mode="json"), sort_keys=True),
    }
