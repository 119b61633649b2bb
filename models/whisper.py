"""Whisper encoder features, as MuseTalk 1.5 feeds its UNet (``openai/whisper-tiny``).

MuseTalk 1.5's ``AudioProcessor`` reads 16 kHz audio, cuts it into 30 s segments, turns each
into the 80-bin log-mel input of ``WhisperFeatureExtractor`` (padded to 30 s: 3000 mel
frames), runs ``WhisperModel.encoder(..., output_hidden_states=True)`` and stacks **every**
hidden state (the embedding output and each layer: 5 for tiny) into ``(1500, L + 1, D)`` per
segment at 50 Hz (step ``k`` covers ``[20k, 20k + 20)`` ms of the segment; ``D`` = 384 for
tiny). :func:`extract_whisper` does the same and keeps, of each segment, the steps that
cover real audio (``ceil(samples / 320)``); MuseTalk trims the concatenation to whole
seconds instead (``floor(seconds) · 50``), which drops up to a second of the tail — the
per-frame windowing (frames ``i − 2 … i + 2``, ten 50 Hz steps) is the family's business.

Family ``whisper`` (hub ``openai/whisper-tiny`` or a local copy with its
``preprocessor_config.json``). The feature extractor is loaded from the same folder, so its
settings are the checkpoint's own. The tiny random stand-in keeps Whisper's real front end
(80 mel bins, two convolutions with stride 1 and 2, 1500 positions): exact 50 Hz framing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

from models.registry import ModelUnavailableError, hf_load_kwargs, register_tiny_builder

SAMPLE_RATE_HZ = 16_000
FRAME_RATE_HZ = 50.0
SEGMENT_S = 30
SAMPLES_PER_STEP = 320  # 10 ms mel hop × the encoder's stride 2


@register_tiny_builder("whisper")
def build_tiny_whisper(directory: Path, seed: int) -> None:
    """Tiny random Whisper (d_model 32, 2 encoder layers) with the real 80-bin front end."""
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=64,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    WhisperModel(config).save_pretrained(directory)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(directory)


def load_whisper(
    path_or_hub_id: str | Path,
    subfolder: str | None = None,
    device: str | torch.device = "cpu",
    revision: str | None = None,
) -> tuple[WhisperModel, WhisperFeatureExtractor]:
    """The model (eval mode) and its own feature extractor; never touches the network for a
    local path or with ``HF_HUB_OFFLINE=1``."""
    kwargs = hf_load_kwargs(path_or_hub_id, subfolder, revision)
    try:
        model = WhisperModel.from_pretrained(str(path_or_hub_id), **kwargs)
        extractor = WhisperFeatureExtractor.from_pretrained(str(path_or_hub_id), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"cannot load Whisper from {path_or_hub_id!s}: {exc}") from exc
    return model.to(device).eval(), extractor


def whisper_num_steps(num_samples: int) -> int:
    """50 Hz steps :func:`extract_whisper` returns for ``num_samples`` at 16 kHz."""
    segment = SEGMENT_S * SAMPLE_RATE_HZ
    full, rest = divmod(num_samples, segment)
    return full * (segment // SAMPLES_PER_STEP) + -(-rest // SAMPLES_PER_STEP)


@torch.inference_mode()
def extract_whisper(
    model: WhisperModel,
    extractor: WhisperFeatureExtractor,
    wave: np.ndarray,
    batch_size: int = 4,
) -> np.ndarray:
    """16 kHz mono ``wave`` → ``(T, L + 1, D)`` float32: every encoder hidden state at 50 Hz."""
    segment = SEGMENT_S * SAMPLE_RATE_HZ
    pieces = [wave[i : i + segment] for i in range(0, len(wave), segment)]
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    for start in range(0, len(pieces), batch_size):
        batch = pieces[start : start + batch_size]
        mel = extractor(
            [np.asarray(p, dtype=np.float32) for p in batch],
            sampling_rate=SAMPLE_RATE_HZ,
            return_tensors="pt",
        ).input_features.to(device, next(model.parameters()).dtype)
        states = model.encoder(mel, output_hidden_states=True).hidden_states
        stacked = torch.stack(states, dim=2).float().cpu().numpy()  # (B, 1500, L + 1, D)
        for piece, feats in zip(batch, stacked, strict=True):
            out.append(feats[: -(-len(piece) // SAMPLES_PER_STEP)])
    if not out:
        raise ValueError("no audio to encode")
    return np.concatenate(out)
