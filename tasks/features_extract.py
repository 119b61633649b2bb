"""The features stage's per-clip work, run on the stage's workers (contract in
:mod:`tasks.features`).

:class:`ClipExtractor` is built once per stage worker by ``FeaturesStage.setup`` from the
completed model pools (:mod:`tasks.pools`; the models are in :mod:`tasks.features_workers`).
Per clip, :meth:`ClipExtractor.extract` reads the audio (the quality stage's re-aligned
track when there is one), submits it to the audio pools, streams the face crops and framed
crops through the video pools (:mod:`tasks.features_video`), aligns every family to the
video frames and commits one safetensors file per family. Failures are ``ItemFailure``:
``BAD_METADATA`` (frame rate), ``FORMAT`` (audio rate or length), ``MISALIGNED`` (audio or
crops against the faces stage's frame count), ``NO_FACE`` (no landmarks to frame from).

This module imports torch and the extractors' helpers; planning the stage never imports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.emoca import FLAME_LAYOUT
from models.fingerprint import ModelFingerprint
from models.hubert import FRAME_RATE_HZ, SAMPLE_RATE_HZ, align_audio_steps, hubert_num_frames
from models.liveportrait import MOTION_LAYOUT
from models.safetensors_io import save_file
from models.sensevoice import FRAME_RATE_HZ as FRAME_RATE_SV
from tasks.base import FailureKind, ItemContext, ItemFailure, ItemInputs
from tasks.features_audio import SenseVoiceResult
from tasks.features_config import FeaturesConfig
from tasks.features_framing import framing_affines
from tasks.features_video import extract_video
from tasks.media import read_wav
from tasks.pools import ModelPool
from tasks.quality_measures import landmarks, read_boxes
from tasks.records import ClipFeatures, FaceTrack, FeatureFile, NormalizedClip, SpeechTags


class ClipExtractor:
    """One stage worker's extractors: every enabled family of a clip, written and recorded."""

    def __init__(
        self,
        config: FeaturesConfig,
        pools: dict[str, ModelPool],
        fingerprints: dict[str, ModelFingerprint],
    ):
        self.config = config
        self.pools = pools
        self.fingerprints = fingerprints  # family -> the weights' fingerprint
        # stride, scale, shift: fixed per VAE, asked once per worker, not per clip
        self.latent_layout: dict[str, Any] = pools["vae_latents"].submit("layout").result()

    def extract(self, inputs: ItemInputs, ctx: ItemContext) -> ClipFeatures:
        """The clip's feature files, committed through ``ctx``, and their record."""
        clip = inputs.get("download", NormalizedClip)
        face = inputs.get("faces", FaceTrack)
        fps = float(face.fps or clip.fps)
        if fps <= 0:
            raise ItemFailure(FailureKind.BAD_METADATA, f"non-positive frame rate {fps}")
        verdict = inputs.records.get("quality")
        audio_ref = getattr(verdict, "aligned_audio", None) or clip.audio  # re-aligned wins
        wave, rate = read_wav(ctx.local_path(audio_ref))
        if rate != SAMPLE_RATE_HZ:
            raise ItemFailure(FailureKind.FORMAT, f"audio is {rate} Hz, HuBERT needs 16000 Hz")
        if hubert_num_frames(len(wave)) == 0:
            raise ItemFailure(FailureKind.FORMAT, f"audio of {len(wave)} samples is too short")
        hubert_task = self.pools["hubert"].submit("extract", wave)  # overlaps the video
        whisper_task = (
            self.pools["whisper"].submit("extract", wave) if self.config.whisper else None
        )
        reference_index = face.num_frames // 2
        video = extract_video(
            ctx.local_path(face.crops),
            self.pools,
            self.latent_layout["stride"],
            self.config.resources.batch_size,
            reference_index,
            self.config.max_inflight_chunks,
            clip=ctx.local_path(clip.video),
            framing=self._framing(ctx.local_path(face.boxes)),
            masked_latents=self.config.masked_latents,
        )
        t = video["vae_latents"].shape[0]
        if abs(t - face.num_frames) > self.config.max_misalignment_frames:
            raise ItemFailure(
                FailureKind.MISALIGNED,
                f"crops decode to {t} frames, faces stage reported {face.num_frames}",
            )
        sv_task = None
        if "sensevoice" in self.pools:
            sv_task = self.pools["sensevoice"].submit(
                "extract", wave, t, fps, self.config.max_misalignment_frames
            )
        aligned = self._align_50hz("HuBERT", hubert_task.result(), len(wave), t, fps)
        cfg, prints = self.config, self.fingerprints
        common = {"clip_id": clip.clip_id, "fps": repr(fps), "num_frames": str(t)}
        latents = torch.from_numpy(video["vae_latents"]).to(getattr(torch, cfg.latent_dtype))
        hubert = torch.from_numpy(aligned).to(getattr(torch, cfg.hubert_dtype))
        vae_tensors, vae_meta = {"latents": latents}, _latent_meta(self.latent_layout)
        if cfg.masked_latents:  # "latents" stays first: it describes the file
            masked = torch.from_numpy(video["masked_latents"]).to(latents.dtype)
            vae_tensors["masked_latents"] = masked
            vae_meta["masked_latents"] = (
                "same layout and normalisation; encoded from the crops with rows H//2: set to "
                "0 (black) in pixel space, as MuseTalk's get_latents_for_unet"
            )
        files = [
            self._save_tensors(
                ctx, "vae_latents", vae_tensors, prints[cfg.vae.family], common, fps, vae_meta,
            ),
            self._save_tensors(
                ctx, "hubert", {"features": hubert}, prints[cfg.hubert.family], common, fps,
                {"layout": "T,2,D", "layer": str(cfg.hubert_layer),
                 "alignment": "frame i <- 50 Hz steps (2i, 2i+1) at 25 fps; tail repeats last"},
            ),
        ]  # fmt: skip
        if cfg.whisper is not None and whisper_task is not None:
            states = whisper_task.result()  # (T_a, L + 1, D)
            flat = self._align_50hz("Whisper", states.reshape(len(states), -1), len(wave), t, fps)
            files.append(self._save_tensors(
                ctx, "whisper",
                {"features": torch.from_numpy(flat.reshape(t, 2, *states.shape[1:])).half()},
                prints[cfg.whisper.family], common, fps,
                {"layout": "T,2,L+1,D: every encoder hidden state (embeddings first)",
                 "alignment": "frame i <- 50 Hz steps (2i, 2i+1) at 25 fps; tail repeats last"},
            ))  # fmt: skip
        if cfg.motion is not None:
            layout = ",".join(f"{name}:{size}" for name, size in MOTION_LAYOUT)
            files.append(
                self._save_tensors(
                    ctx, "liveportrait_motion",
                    {"motion": torch.from_numpy(video["liveportrait_motion"])},
                    prints[cfg.motion.family], common, fps,
                    {"layout": f"T,133 ({layout}); angles in degrees",
                     "input": "LivePortrait's official crop (2.3 x landmark square, vy -0.125, "
                              "rotated upright), 256x256 RGB in [0, 1]"},
                )
            )  # fmt: skip
        if cfg.flame is not None:
            layout = ",".join(f"{name}:{size}" for name, size in FLAME_LAYOUT)
            files.append(
                self._save_tensors(
                    ctx, "emoca_flame", {"flame": torch.from_numpy(video["emoca_flame"])},
                    prints[cfg.flame.family], common, fps,
                    {"layout": f"T,159 ({layout}); pose axis-angle",
                     "input": "EMOCA's official crop (1.1 x 1.25 x 68-landmark box), "
                              "224x224 RGB in [0, 1]"},
                )
            )  # fmt: skip
        speech = None
        if cfg.sensevoice is not None and sv_task is not None:
            sv: SenseVoiceResult = sv_task.result()
            sv_fp = self.fingerprints[cfg.sensevoice.family]
            files.append(self._save_tensors(
                ctx, "sensevoice",
                {"features": torch.from_numpy(sv.features),
                 "frame_index": torch.from_numpy(sv.frame_index),
                 "ctc_tokens": torch.from_numpy(sv.ctc_tokens)},
                sv_fp, common, frame_rate_hz=FRAME_RATE_SV,
                meta={"layout": "features (T_s, 512) at 1000/60 Hz, prompt rows dropped; "
                                "frame_index (T,); ctc_tokens (T,) CTC argmax id of the "
                                "frame's row, blank 0",
                      "alignment": "video frame i <- step floor((2i + 1) / 3) at 25 fps",
                      "ctc_vocab_size": str(sv.vocab_size),
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
                {name: torch.from_numpy(video[f"reference_{name}"])
                 for name in ("patch_tokens", "cls", "image")},
                fp, common, frame_rate_hz=0.0,
                meta={"frame_index": str(frame),
                      "layout": "cls (D), patch_tokens (N, D) row-major 14 px patches, "
                                "image (H, W, 3) uint8"},
            ))  # fmt: skip
        return ClipFeatures(
            clip_id=clip.clip_id,
            fps=fps,
            num_frames=t,
            files=files,
            audio=audio_ref,
            audio_source="original" if audio_ref == clip.audio else "aligned",
            speech=speech,
        )

    def _framing(self, boxes: Path) -> dict[str, np.ndarray]:
        """Per-frame crop affines of the enabled framed extractors, from the face track."""
        try:
            return framing_affines(
                landmarks(read_boxes(boxes)), list(self.pools), self.config.framing_window_frames
            )
        except ValueError as exc:  # no frame of the track has landmarks
            raise ItemFailure(FailureKind.NO_FACE, f"cannot frame the face crops: {exc}") from exc

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

    def _align_50hz(
        self, what: str, feats: np.ndarray, num_samples: int, num_frames: int, fps: float
    ) -> np.ndarray:
        """50 Hz steps (HuBERT, Whisper) → two per video frame; MISALIGNED beyond tolerance."""
        steps = feats.shape[0]
        audio_frames = steps * fps / FRAME_RATE_HZ
        if abs(audio_frames - num_frames) > self.config.max_misalignment_frames:
            raise ItemFailure(
                FailureKind.MISALIGNED,
                f"audio gives {steps} {what} steps (~{audio_frames:.1f} frames at {fps:g} fps) "
                f"for {num_frames} video frames ({num_samples} samples)",
            )
        return align_audio_steps(feats, num_frames, fps)


def _latent_meta(layout: dict[str, Any]) -> dict[str, str]:
    """How the stored latents were normalised, so a reader can undo it."""
    if layout["flux2"]:
        return {
            "layout": "T,4C,H/16,W/16 (2x2 patchified, channel order c,dy,dx)",
            "normalisation": "(patchify(mode) - bn.running_mean) / sqrt(bn.running_var + eps)",
        }
    return {
        "layout": "T,C,H/8,W/8",
        "scaling_factor": repr(layout["scale"]),
        "shift_factor": repr(layout["shift"]),
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
