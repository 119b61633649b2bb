"""HuBERT speech features through transformers ``HubertModel``.

Family ``hubert`` (hub: ``facebook/hubert-large-ll60k``, 1024-d, 24 layers). The feature
extractor is built in code rather than read from the hub, so a checkpoint without a
``preprocessor_config.json`` still works: per-utterance zero-mean/unit-variance
normalisation and attention masks, as the layer-norm (``do_stable_layer_norm``) variants need.

Framing: the conv front end has a 400-sample receptive field and a 320-sample stride at
16 kHz, so ``N`` samples give ``floor((N - 400) / 320) + 1`` steps (50 Hz nominal; 1 s → 49).
Step ``k`` sees samples ``[320k, 320k + 400)``. :func:`extract_hubert_windowed` uses that to
run long audio in overlapping windows whose steps line up exactly with a single pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

from models.registry import ModelUnavailableError, hf_load_kwargs, register_tiny_builder

SAMPLE_RATE_HZ = 16_000
FRAME_RATE_HZ = 50.0
STEPS_PER_FRAME = 2  # HuBERT steps per video frame at 25 fps
RECEPTIVE_FIELD_SAMPLES = 400
HOP_SAMPLES = 320


@register_tiny_builder("hubert")
def build_tiny_hubert(directory: Path, seed: int) -> None:
    """Tiny random HuBERT (hidden 32, 2 layers) with the real conv strides: exact 50 Hz framing."""
    torch.manual_seed(seed)
    config = HubertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    HubertModel(config).save_pretrained(directory)


def load_hubert(
    path_or_hub_id: str | Path,
    subfolder: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
) -> HubertModel:
    """Load a ``HubertModel`` (local directory or hub id) in eval mode.

    Local paths and ``HF_HUB_OFFLINE=1`` never touch the network; a missing model raises
    :class:`ModelUnavailableError`.
    """
    kwargs = hf_load_kwargs(path_or_hub_id, subfolder, revision)
    try:
        model = HubertModel.from_pretrained(str(path_or_hub_id), dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot load HuBERT from {path_or_hub_id!s}: {exc}") from exc
    return model.to(device).eval()


def make_feature_extractor() -> Wav2Vec2FeatureExtractor:
    """The HuBERT-Large input pipeline: 16 kHz mono, normalised, with attention masks."""
    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLE_RATE_HZ,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    )


def hubert_num_frames(num_samples: int) -> int:
    """HuBERT steps for ``num_samples`` at 16 kHz: ``floor((N - 400) / 320) + 1``, 0 if shorter."""
    if num_samples < RECEPTIVE_FIELD_SAMPLES:
        return 0
    return (num_samples - RECEPTIVE_FIELD_SAMPLES) // HOP_SAMPLES + 1


def check_layer(model: HubertModel, layer: int) -> None:
    """``layer`` must be -1 (model output) or an index ``0..L`` into ``hidden_states``."""
    n = model.config.num_hidden_layers
    if not -1 <= layer <= n:
        raise ValueError(f"layer {layer} out of range for a {n}-layer HuBERT (-1 or 0..{n})")


@torch.inference_mode()
def extract_hubert(
    model: HubertModel,
    fe: Wav2Vec2FeatureExtractor,
    waves: list[np.ndarray],
    layer: int = -1,
) -> list[np.ndarray]:
    """Features ``(T_i, D)`` float32 for each 16 kHz mono wave, run as one padded batch.

    ``layer = -1`` is the model output (``last_hidden_state``: last transformer layer plus
    the encoder's final LayerNorm). ``0..L`` index ``hidden_states`` as transformers 5
    records them: 0 = input of the first transformer layer (projected conv features plus
    positional conv), ``i`` = output of layer ``i`` *before* the final LayerNorm, so
    ``layer = L`` differs from -1 by that LayerNorm. ``T_i = hubert_num_frames(len(wave_i))``;
    waves shorter than 400 samples raise ``ValueError``.
    """
    check_layer(model, layer)
    if not waves:
        return []
    short = [len(w) for w in waves if len(w) < RECEPTIVE_FIELD_SAMPLES]
    if short:
        raise ValueError(f"audio of {short[0]} samples is shorter than one HuBERT window (400)")
    inputs = fe(
        [np.asarray(w, dtype=np.float32) for w in waves],
        sampling_rate=SAMPLE_RATE_HZ,
        padding=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    param = next(model.parameters())
    values = inputs["input_values"].to(param.device, param.dtype)
    mask = inputs["attention_mask"].to(param.device)
    out = model(values, attention_mask=mask, output_hidden_states=layer != -1)
    hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
    lengths = model._get_feat_extract_output_lengths(mask.sum(-1)).tolist()
    return [hidden[i, : int(n)].float().cpu().numpy() for i, n in enumerate(lengths)]


def extract_hubert_windowed(
    model: HubertModel,
    fe: Wav2Vec2FeatureExtractor,
    wave: np.ndarray,
    layer: int = -1,
    window_steps: int = 1000,
    context_steps: int = 50,
    batch_size: int = 4,
) -> np.ndarray:
    """Features ``(hubert_num_frames(len(wave)), D)`` for one long wave, in bounded memory.

    The step range is cut into windows of ``window_steps``; each runs with ``context_steps``
    of extra audio on both sides, which is then dropped, so attention cost stays
    O(window²) instead of O(T²). Because a segment starting at sample ``320·c`` reproduces
    the original steps ``c, c+1, …`` exactly, the windows tile the single-pass step grid
    with no gap or overlap. Trade-off: each window is normalised and attends on its own,
    so values near window edges differ slightly from a single pass (the context reduces it).
    Audio that fits in one window is processed in one pass, identical to
    :func:`extract_hubert`.
    """
    total = hubert_num_frames(len(wave))
    if total == 0:
        raise ValueError(f"audio of {len(wave)} samples is shorter than one HuBERT window (400)")
    if total <= window_steps:
        return extract_hubert(model, fe, [wave], layer)[0]
    jobs: list[tuple[int, int, int]] = []  # (context start, core start, core end) in steps
    for k0 in range(0, total, window_steps):
        k1 = min(total, k0 + window_steps)
        jobs.append((max(0, k0 - context_steps), k0, k1))
    pieces: list[np.ndarray] = []
    for b in range(0, len(jobs), max(1, batch_size)):
        batch = jobs[b : b + batch_size]
        segments = []
        for c0, _, k1 in batch:
            c1 = min(total, k1 + context_steps)
            end = (c1 - 1) * HOP_SAMPLES + RECEPTIVE_FIELD_SAMPLES
            segments.append(wave[c0 * HOP_SAMPLES : end])
        feats = extract_hubert(model, fe, segments, layer)
        for (c0, k0, k1), f in zip(batch, feats, strict=True):
            pieces.append(f[k0 - c0 : k1 - c0])
    return np.concatenate(pieces)


def align_audio_steps(
    feats: np.ndarray, num_frames: int, fps: float, steps_per_frame: int = STEPS_PER_FRAME
) -> np.ndarray:
    """``(T_a, D)`` 50 Hz features → ``(num_frames, steps_per_frame, D)`` per video frame.

    Step ``k`` of frame ``f`` reads the 50 Hz position
    ``(f·steps_per_frame + k)·50/(steps_per_frame·fps)``, linearly interpolated between its
    two neighbours; positions past the last step repeat it. The features stage and every
    consumer that re-extracts audio (augmentation) use this rule.
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
