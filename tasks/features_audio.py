"""SenseVoice features of a clip's audio, aligned to its video frames.

SenseVoiceSmall's encoder emits one 512-d row per 60 ms (LFR of 6 fbank frames at 10 ms,
≈16.67 Hz) after its 4 prompt rows, which are dropped (see :mod:`models.sensevoice`).
Step ``k`` stacks fbank frames centred on frame ``6k``, i.e. on ``60k + 12.5`` ms. Video
frame ``i`` of a 25 fps clip is centred on ``40i + 20`` ms; the nearest step is

    k(i) = floor((2i + 1) / 3)        (frames 3j, 3j+1, 3j+2  ->  steps 2j, 2j+1, 2j+1)

— two SenseVoice steps per three video frames. At another frame rate the same nearest-
centre rule is ``round((1000 i / fps + 1000 / (2 fps) - 12.5) / 60)``, which reduces to the
formula above at 25 fps. Indices are clamped to the last step. The file keeps the native
``(T_s, 512)`` rows plus ``frame_index`` ``(T,)``, so no row is duplicated on disk; a clip
is ``MISALIGNED`` when ``|T_s · fps / (1000/60) − T|`` exceeds the tolerance in frames.
``ctc_tokens`` ``(T,)`` are the CTC argmax ids of the same rows, per video frame
(``ctc_tokens[i]`` = id of row ``frame_index[i]``; blanks kept): discrete keys for Engram.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.sensevoice import FRAME_RATE_HZ, SenseVoiceSmall, extract_sensevoice
from models.sensevoice_frontend import sensevoice_num_frames
from tasks.base import FailureKind, ItemFailure


def sensevoice_frame_index(num_frames: int, fps: float, num_steps: int) -> np.ndarray:
    """For every video frame, the SenseVoice step whose centre is nearest (see above)."""
    if num_steps <= 0:
        raise ValueError("no SenseVoice steps to align")
    centre_ms = (np.arange(num_frames, dtype=np.float64) + 0.5) * 1000.0 / fps
    index = np.floor((centre_ms - 12.5) / (1000.0 / FRAME_RATE_HZ) + 0.5).astype(np.int64)
    return np.clip(index, 0, num_steps - 1)


@dataclass(frozen=True)
class SenseVoiceResult:
    features: np.ndarray  # (T_s, 512) float32
    frame_index: np.ndarray  # (T,) int64
    ctc_tokens: np.ndarray  # (T,) int64: CTC argmax id of row frame_index[i]
    vocab_size: int  # CTC vocabulary size (ids lie in [0, vocab_size))
    language: str | None
    emotion: str | None
    event: str | None
    transcript: str


def run_sensevoice(
    model: SenseVoiceSmall,
    wave: np.ndarray,
    num_frames: int,
    fps: float,
    max_misalignment_frames: int,
) -> SenseVoiceResult:
    steps = sensevoice_num_frames(len(wave))
    if steps == 0:
        raise ItemFailure(FailureKind.FORMAT, f"audio of {len(wave)} samples is too short")
    audio_frames = steps * fps / FRAME_RATE_HZ
    if abs(audio_frames - num_frames) > max_misalignment_frames:
        raise ItemFailure(
            FailureKind.MISALIGNED,
            f"audio gives {steps} SenseVoice steps (~{audio_frames:.1f} frames at {fps:g} fps) "
            f"for {num_frames} video frames",
        )
    with torch.inference_mode():
        out = extract_sensevoice(model, wave.astype(np.float32))
    frame_index = sensevoice_frame_index(num_frames, fps, out.features.shape[0])
    return SenseVoiceResult(
        features=out.features,
        frame_index=frame_index,
        ctc_tokens=out.ctc_ids[frame_index],
        vocab_size=out.vocab_size,
        language=out.language,
        emotion=out.emotion,
        event=out.event,
        transcript=out.transcript,
    )
