"""The features stage's model workers: one class per extractor, one model load each.

Every worker is built by a picklable factory (:func:`tasks.pools.build_worker`, which
names the class by import path) inside the process that will run it: the stage's own
worker, or an actor of the extractor's own Ray pool (see :mod:`tasks.pools`). The
constructor resolves the device and loads the model once; the methods take and return
plain numpy arrays so calls can cross processes.

Device and precision: a worker uses CUDA when its resources ask for a GPU fraction and one
is visible, else the CPU, where everything runs in float32. On CUDA, calls run under
``torch.autocast`` with ``amp_dtype`` (mixed precision), except the VAE under float16 when
its config asks for ``force_upcast`` (FLUX.1 and SD VAEs overflow in float16); bfloat16
keeps float32's range and is used for the VAE too.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.dinov2 import embed_reference, load_dinov2
from models.emoca import FLAME_DIM, extract_flame, load_emoca
from models.hubert import (
    FRAME_RATE_HZ,
    check_layer,
    extract_hubert_windowed,
    load_hubert,
    make_feature_extractor,
)
from models.liveportrait import MOTION_DIM, extract_motion, load_motion_extractor
from models.registry import ModelSpec, ensure_model
from models.sensevoice import load_sensevoice
from models.vae import (
    encode_frames,
    is_flux2,
    latent_factors,
    latent_stride,
    load_vae,
    mask_lower_half,
)
from models.whisper import extract_whisper, load_whisper
from tasks.base import FailureKind, ItemFailure
from tasks.features_audio import SenseVoiceResult, run_sensevoice

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "none": None}


class ExtractorWorker:
    """Shared set-up: device choice, model path, autocast policy, inner batch size."""

    def __init__(
        self, spec: ModelSpec, data_root: str, use_gpu: bool, amp_dtype: str, batch_size: int
    ):
        cuda = use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        self.amp_dtype = AMP_DTYPES[amp_dtype] if cuda else None
        self.batch_size = batch_size
        self.spec = spec
        path = ensure_model(spec, Path(data_root))
        self.source = str(path or spec.source)  # local path, else the hub id

    def autocast(self) -> AbstractContextManager[Any]:
        """This worker's mixed-precision context: autocast on CUDA, nothing on the CPU."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def describe(self) -> dict[str, Any]:
        """Where this worker runs: device and autocast dtype (for logs and tests)."""
        return {"device": str(self.device), "amp_dtype": str(self.amp_dtype)}


class VaeWorker(ExtractorWorker):
    """Face crops → normalised VAE latents (see :func:`models.vae.encode_frames`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.vae = load_vae(
            self.source,
            self.spec.subfolder,
            self.device,
            torch.float32,
            revision=self.spec.revision,
            family=self.spec.family,
        )
        self.force_upcast = bool(getattr(self.vae.config, "force_upcast", False))

    def layout(self) -> dict[str, Any]:
        """Stride, scale, shift and FLUX.2-ness: what a reader needs to undo the latents."""
        scale, shift = latent_factors(self.vae)
        return {
            "stride": latent_stride(self.vae),
            "scale": scale,
            "shift": shift,
            "flux2": is_flux2(self.vae),
        }

    def autocast(self) -> AbstractContextManager[Any]:
        if self.force_upcast and self.amp_dtype == torch.float16:
            return nullcontext()
        return super().autocast()

    def encode(self, frames: np.ndarray) -> np.ndarray:
        with self.autocast():
            return encode_frames(self.vae, frames, self.batch_size).float().numpy()

    def encode_with_masked(self, frames: np.ndarray) -> np.ndarray:
        """``(2, N, ...)``: the frames' latents, then those of the frames with their lower
        half blacked out in pixel space (MuseTalk's masked input, :func:`mask_lower_half`);
        both in one :meth:`encode` call."""
        both = self.encode(np.concatenate([frames, mask_lower_half(frames)]))
        return both.reshape(2, len(frames), *both.shape[1:])


class MotionWorker(ExtractorWorker):
    """LivePortrait-framed 256 px crops → motion ``(T, 133)`` (RGB in [0, 1])."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.model = load_motion_extractor(self.source, device=self.device)

    def extract(self, frames: np.ndarray) -> np.ndarray:
        out = extract_motion(self.model, frames, self.batch_size, amp_dtype=self.amp_dtype)
        return _check_dim(out, MOTION_DIM, "liveportrait_motion")


class FlameWorker(ExtractorWorker):
    """EMOCA-framed 224 px crops → FLAME ``(T, 159)``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.model = load_emoca(self.source, device=self.device)

    def extract(self, frames: np.ndarray) -> np.ndarray:
        out = extract_flame(self.model, frames, self.batch_size, amp_dtype=self.amp_dtype)
        return _check_dim(out, FLAME_DIM, "emoca_flame")


class ReferenceWorker(ExtractorWorker):
    """One reference frame → DINOv2 ``cls`` ``(D,)`` and ``patch_tokens`` ``(N, D)``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.encoder = load_dinov2(
            self.source, self.spec.subfolder, self.device, self.spec.revision
        )

    def embed(self, image: np.ndarray) -> dict[str, np.ndarray]:
        with self.autocast():
            emb = embed_reference(self.encoder, image)
        return {k: v.float().cpu().numpy() for k, v in emb.items()}


class HubertWorker(ExtractorWorker):
    """16 kHz wave → HuBERT features ``(T_a, D)`` at 50 Hz, windowed for long audio."""

    def __init__(self, *args: Any, layer: int, window_s: float, context_s: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.model = load_hubert(
            self.source, self.spec.subfolder, self.device, revision=self.spec.revision
        )
        check_layer(self.model, layer)
        self.layer = layer
        self.window_steps = int(window_s * FRAME_RATE_HZ)
        self.context_steps = int(context_s * FRAME_RATE_HZ)
        self.feature_extractor = make_feature_extractor()

    def extract(self, wave: np.ndarray) -> np.ndarray:
        with self.autocast():
            feats = extract_hubert_windowed(
                self.model,
                self.feature_extractor,
                wave,
                self.layer,
                window_steps=self.window_steps,
                context_steps=self.context_steps,
                batch_size=self.batch_size,
            )
        return np.asarray(feats, dtype=np.float32)


class WhisperWorker(ExtractorWorker):
    """16 kHz wave → every Whisper encoder hidden state ``(T_a, L + 1, D)`` at 50 Hz."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.model, self.extractor = load_whisper(
            self.source, self.spec.subfolder, self.device, revision=self.spec.revision
        )

    def extract(self, wave: np.ndarray) -> np.ndarray:
        with self.autocast():
            return extract_whisper(self.model, self.extractor, wave, self.batch_size)


class SenseVoiceWorker(ExtractorWorker):
    """16 kHz wave → SenseVoice features, frame index and tags (:func:`run_sensevoice`)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.model = load_sensevoice(self.source, self.device)

    def extract(
        self, wave: np.ndarray, num_frames: int, fps: float, max_misalignment_frames: int
    ) -> SenseVoiceResult:
        with self.autocast():
            return run_sensevoice(self.model, wave, num_frames, fps, max_misalignment_frames)


def _check_dim(out: np.ndarray, dim: int, family: str) -> np.ndarray:
    if out.ndim != 2 or out.shape[1] != dim:
        raise ItemFailure(FailureKind.MODEL, f"{family} gave {out.shape}, expected (T, {dim})")
    return out.astype(np.float32, copy=False)
