"""Quality stage: measurable rules that decide whether a clip becomes training data.

Every rule records its measured value, its threshold and a human-readable reason, so the
catalog's ``quality`` stats table answers "why was this clip dropped?" with SQL. Hard rules
reject the clip (the verdict's ``rejection_reason`` marks it ``filtered``); a rule listed in
``soft_rules`` is still measured but only multiplies the clip's sampling weight by
``soft_fail_weight`` when it fails.

Hard rules by default:

- ``duration``: clip duration ≥ ``min_duration_s``.
- ``face_size``: median side of the detected main face ≥ ``min_face_size_px`` (design notes:
  256 px, as in LatentSync's earlier "face smaller than 256×256" filter; small sample videos
  need a lower value in their config).
- ``multi_face``: the largest other face stays below ``max_second_face_ratio`` × the main
  face's side on every detection frame ("more than one face of comparable size").
- ``blur``: median over ``blur_sample_frames`` evenly spaced crops of the variance of the
  Laplacian of the grayscale central face region ≥ ``min_blur_laplacian_var``. The measure
  is taken on the crops as training sees them, so a small face upsampled to the crop size
  counts as blurry too. Calibration (256 px crops, crf 17): the five real fixture clips
  measure 23–420; a Gaussian blur of σ = 6 px on a 150 px face measures ≈ 11 at 128 px, and
  h264 noise keeps even very blurred crops near 10, so the default threshold is 15.
- ``face_lost``: share of frames where the face was not seen (interpolated across short
  gaps) ≤ ``max_lost_fraction``.
- ``shot_change``: hard cuts found by the faces stage ≤ ``max_shot_changes`` (a clip must
  be one continuous shot, as LatentSync's scene split ensures).
- ``speech_floor``: share of the clip Silero VAD marks as speech ≥
  ``min_speech_fraction_floor`` (5 %): a clip with (next to) no speech teaches an
  audio-driven model nothing, so it is rejected, not just down-weighted by ``speech``.
- ``av_offset``: |audio-video offset| ≤ ``max_av_offset_ms``; value is the signed offset
  (> 0: audio lags video). Measured by ``av_offset_method``: ``xcorr``, an offline
  estimate from mouth motion and the speech envelope, or ``syncnet`` with the official
  SyncNet weights at ``syncnet_weights`` (see :mod:`tasks.quality_sync`). An estimate with
  confidence < ``min_av_offset_confidence`` (xcorr: peak z-score; SyncNet: Sync-C, 3 as
  in LatentSync) passes *unmeasured*: ``measured=False``, reason "unmeasured offset
  (...)", counted in the ``unmeasured`` column of ``quality_rules`` (``talkforge quality``,
  ``dashboards/03_quality_rules.sql``) apart from measured passes. With
  ``realign_confident_offsets`` a confident offset beyond the limit passes instead of
  failing: the re-aligned audio is committed as ``audio_aligned.wav`` and the verdict
  carries it with the applied ``audio_shift_ms``.

Soft rules by default (see :mod:`tasks.quality_measures` for the measures):

- ``yaw``: 90th percentile of the landmark yaw proxy ≤ ``max_yaw_ratio`` (0.35 ≈ 30°).
- ``lip_motion``: the mouth region's frame-to-frame motion (90th percentile over the
  clip, in % of the mouth width per frame, independent of face size and contrast) ≥
  ``min_lip_motion``; a still mouth means nobody is talking on screen (a photo or a frozen
  frame under a voice-over). Real talking clips measure 2.5–5.3 at face sizes of
  80–380 px, swaying or frozen still photos at most 1.0 (calibration in
  :mod:`tasks.quality_measures`), hence 1.6.
- ``speech``: share of the clip Silero VAD marks as speech ≥ ``min_speech_fraction``.
- ``snr``: speech-to-noise power ratio ≥ ``min_snr_db`` (see :mod:`tasks.quality_audio`).

Models: Silero VAD (weights in the ``silero-vad`` wheel) and, with ``av_offset_method:
syncnet``, SyncNet (``resources.batch_size`` windows per call, on the GPU when
``resources.num_gpus > 0``); loaded once per worker in :meth:`QualityStage.setup` and
fingerprinted through :meth:`QualityStage.model_specs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from metrics.sync import SyncNetScorer
from models.syncnet_spec import syncnet_model_spec
from tasks.base import ItemContext, ItemInputs, Stage
from tasks.media import read_wav, write_wav
from tasks.quality_audio import SileroVad, silero_model_spec
from tasks.quality_config import QualityConfig
from tasks.quality_measures import (
    landmarks,
    laplacian_variance,
    mouth_roi,
    mouth_width_px,
    read_boxes,
    scan_crops,
    yaw_ratios,
)
from tasks.quality_sync import (
    AvOffsetDecision,
    judge_av_offset,
    shift_audio,
    syncnet_offset,
    xcorr_offset,
)
from tasks.records import FaceTrack, NormalizedClip, QualityVerdict, RuleResult

__all__ = ["QualityStage", "laplacian_variance"]


class QualityStage(Stage[QualityConfig]):
    """Applies the rules to a clip and its face track; returns a :class:`QualityVerdict`."""

    name = "quality"
    # 2: the av_offset rule; 3: speech floor, unmeasured av_offset; 4: lip motion as
    # face-size-free mouth flow, av_offset's measured flag stored
    code_version = "4"
    requires = ("download", "faces")
    config_type = QualityConfig

    vad: SileroVad | None = None
    syncnet: SyncNetScorer | None = None

    def _syncnet_path(self) -> Path | None:
        w = self.config.syncnet_weights
        if self.config.av_offset_method != "syncnet" or w is None:
            return None
        p = Path(w).expanduser()
        return p if p.is_absolute() else Path(self.env.data_root) / p

    def model_specs(self) -> list[Any]:
        path = self._syncnet_path()
        return [silero_model_spec()] + ([syncnet_model_spec(str(path))] if path else [])

    def setup(self) -> None:
        self.vad = SileroVad()
        path = self._syncnet_path()
        if path is not None:
            res = self.config.resources
            device = "cuda" if res.num_gpus > 0 else "cpu"
            self.syncnet = SyncNetScorer(path, device, res.batch_size)

    def process(self, inputs: ItemInputs, ctx: ItemContext) -> QualityVerdict:
        if self.vad is None:
            self.setup()
        assert self.vad is not None
        cfg = self.config
        clip = inputs.get("download", NormalizedClip)
        face = inputs.get("faces", FaceTrack)
        samples, rate_hz = read_wav(ctx.local_path(clip.audio))
        audio = self.vad.measure(samples, rate_hz)
        boxes = read_boxes(ctx.local_path(face.boxes))
        scan = scan_crops(
            ctx.local_path(face.crops),
            face.crop_size_px,
            face.num_frames,
            cfg.blur_sample_frames,
            cfg.blur_center_fraction,
            mouth_roi(boxes, face.crop_size_px),
            mouth_width_px(boxes, face.crop_size_px),
        )
        blur, lip = scan.blur_laplacian_var, scan.lip_motion
        lost = face.lost_frames / face.num_frames if face.num_frames else 1.0
        cuts = int(np.count_nonzero(boxes["shot_change"]))
        lm = landmarks(boxes)
        lm = lm[~np.isnan(lm).any(axis=1)]
        yaw = float(np.percentile(np.abs(yaw_ratios(lm)), 90)) if len(lm) else 0.0
        second, max_second = face.max_second_face_ratio, cfg.max_second_face_ratio
        speech, min_speech = audio.speech_fraction, cfg.min_speech_fraction
        av = self._av_offset(clip, face, boxes, samples, rate_hz, ctx)
        rules = [
            self._rule(
                "duration",
                clip.duration_s,
                cfg.min_duration_s,
                clip.duration_s >= cfg.min_duration_s,
                f"duration {clip.duration_s:.2f} s < {cfg.min_duration_s:.2f} s",
            ),
            self._rule(
                "face_size",
                face.median_face_size_px,
                cfg.min_face_size_px,
                face.median_face_size_px >= cfg.min_face_size_px,
                f"face {face.median_face_size_px:.0f} px < {cfg.min_face_size_px:.0f} px",
            ),
            self._rule(
                "multi_face",
                second,
                max_second,
                second < max_second,
                f"second face {second:.2f} of the main face's size >= {max_second:.2f} "
                f"({face.max_faces_in_frame} faces in a frame)",
            ),
            self._rule(
                "blur",
                blur,
                cfg.min_blur_laplacian_var,
                blur >= cfg.min_blur_laplacian_var,
                f"Laplacian variance {blur:.1f} < {cfg.min_blur_laplacian_var:.1f} (blurry)",
            ),
            self._rule(
                "face_lost",
                lost,
                cfg.max_lost_fraction,
                lost <= cfg.max_lost_fraction,
                f"face lost in {lost:.0%} of frames > {cfg.max_lost_fraction:.0%}",
            ),
            self._rule(
                "shot_change",
                cuts,
                cfg.max_shot_changes,
                cuts <= cfg.max_shot_changes,
                f"{cuts} shot change(s) > {cfg.max_shot_changes}",
            ),
            self._rule(
                "yaw",
                yaw,
                cfg.max_yaw_ratio,
                yaw <= cfg.max_yaw_ratio,
                f"head turned: yaw ratio {yaw:.2f} > {cfg.max_yaw_ratio:.2f}",
            ),
            self._rule(
                "lip_motion",
                lip,
                cfg.min_lip_motion,
                lip >= cfg.min_lip_motion,
                f"mouth still: lip motion {lip:.2f} < {cfg.min_lip_motion:.2f}",
            ),
            self._rule(
                "speech",
                speech,
                min_speech,
                speech >= min_speech,
                f"speech in {speech:.0%} of the clip < {min_speech:.0%}",
            ),
            self._rule(
                "speech_floor",
                speech,
                cfg.min_speech_fraction_floor,
                speech >= cfg.min_speech_fraction_floor,
                f"no usable speech: {speech:.0%} of the clip < {cfg.min_speech_fraction_floor:.0%}"
                " (an audio-driven model cannot learn from it)",
            ),
            self._rule(
                "snr",
                audio.snr_db,
                cfg.min_snr_db,
                audio.snr_db >= cfg.min_snr_db,
                f"noisy audio: SNR {audio.snr_db:.1f} dB < {cfg.min_snr_db:.1f} dB"
                + ("" if audio.speech_s else " (no speech found)"),
            ),
            av.rule,
        ]
        accepted = all(r.passed for r in rules if r.hard)
        weight = 1.0
        for r in rules:
            if not r.hard and not r.passed:
                weight *= cfg.soft_fail_weight
        aligned = None
        if av.audio_shift_ms:
            wav = ctx.scratch / "audio_aligned.wav"
            write_wav(wav, shift_audio(samples, rate_hz, av.audio_shift_ms), rate_hz)
            aligned = ctx.commit(wav, "audio_aligned.wav", "audio")
        return QualityVerdict(
            clip_id=clip.clip_id,
            accepted=accepted,
            sampling_weight=weight,
            rules=rules,
            audio_shift_ms=av.audio_shift_ms,
            aligned_audio=aligned,
        )

    def _av_offset(
        self,
        clip: NormalizedClip,
        face: FaceTrack,
        boxes: dict[str, np.ndarray],
        samples: np.ndarray,
        rate_hz: int,
        ctx: ItemContext,
    ) -> AvOffsetDecision:
        cfg = self.config
        crops, px = ctx.local_path(face.crops), face.crop_size_px
        if cfg.av_offset_method == "syncnet":
            assert self.syncnet is not None  # loaded by setup()
            est = syncnet_offset(self.syncnet, crops, px, boxes, samples, rate_hz, clip.fps)
        else:
            est = xcorr_offset(crops, px, mouth_roi(boxes, px), samples, rate_hz, clip.fps)
        return judge_av_offset(
            est,
            cfg.max_av_offset_ms,
            cfg.min_av_offset_confidence,
            cfg.realign_confident_offsets,
            hard="av_offset" not in cfg.soft_rules,
        )

    def _rule(
        self, rule: str, value: float, threshold: float, passed: bool, reason: str
    ) -> RuleResult:
        return RuleResult(
            rule=rule,
            value=float(value),
            threshold=float(threshold),
            passed=bool(passed),
            hard=rule not in self.config.soft_rules,
            reason="" if passed else reason,
        )
