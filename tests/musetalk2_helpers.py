"""Feature-cache files, a memory bank and tiny configs for the musetalk2 tests.

Clips are written in the features stage's file layout (``vae_latents/latents``,
``hubert/features``, ``sensevoice/features`` + ``frame_index`` + ``ctc_tokens`` (vocabulary
``CTC_VOCAB`` in the ``ctc_vocab_size`` metadata), ``liveportrait_motion/motion``,
``emoca_flame/flame``, a 16 kHz wav). Latents are smooth per-frame fields whose lower half
follows the frame's audio (a learnable mapping), so a tiny network can fit one clip.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from generators.blocks.engram_hash import (
    assign_codes,
    flat_indices,
    make_multipliers,
    make_primes,
)
from generators.family_config import DataLayout, FeatureClip
from models.emoca import FLAME_DIM
from models.liveportrait import MOTION_DIM

C, H, W, AUDIO_DIM = 4, 8, 8, 12
CTC_VOCAB = 16


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def clip_features(
    directory: Path, clip_id: str, frames: int, seed: int = 0, weight: float = 1.0
) -> FeatureClip:
    """Write one clip's feature files under ``directory/clip_id`` and describe them."""
    rng = np.random.default_rng(seed)
    folder = directory / clip_id
    folder.mkdir(parents=True, exist_ok=True)
    phase = rng.uniform(0, 2 * np.pi, size=(1, C, 1, 1))
    yy, xx = np.meshgrid(np.linspace(0, 1, H), np.linspace(0, 1, W), indexing="ij")
    hub = rng.normal(size=(frames, 2, AUDIO_DIM)).astype(np.float32)
    lat = np.zeros((frames, C, H, W), np.float32)
    mouth_open = np.sin(np.arange(frames) * 0.7) * 0.5 + 0.5
    for t in range(frames):
        lat[t] = np.sin(3 * xx + 2 * yy + phase[0])  # identity: the same face in every frame
        lat[t, :, H // 2 :] += mouth_open[t] * np.cos(5 * xx[H // 2 :] + phase[0])
        hub[t, :, 0] = mouth_open[t] * 3.0  # the audio says how open the mouth is
    rows = int(np.ceil(frames * 2 / 3))
    sv = rng.normal(size=(rows, AUDIO_DIM)).astype(np.float32)
    index = np.minimum((2 * np.arange(frames) + 1) // 3, rows - 1)
    sv[index, 0] = mouth_open * 3.0
    # CTC argmax per frame: blank (0) on a closed mouth, else a token of how open it is
    ctc = np.where(mouth_open < 0.2, 0, 1 + np.round(mouth_open * (CTC_VOCAB - 2))).astype(int)
    motion = rng.normal(scale=0.1, size=(frames, MOTION_DIM)).astype(np.float32)
    flame = rng.normal(scale=0.1, size=(frames, FLAME_DIM)).astype(np.float32)
    files = {
        "vae_latents": {"latents": torch.from_numpy(lat).half()},
        "hubert": {"features": torch.from_numpy(hub)},
        "sensevoice": {
            "features": torch.from_numpy(sv),
            "frame_index": torch.from_numpy(index),
            "ctc_tokens": torch.from_numpy(ctc.astype(np.int64)),
        },
        "liveportrait_motion": {"motion": torch.from_numpy(motion)},
        "emoca_flame": {"flame": torch.from_numpy(flame)},
    }
    paths = {}
    for family, tensors in files.items():
        paths[family] = str(folder / f"{family}.safetensors")
        meta = {"ctc_vocab_size": str(CTC_VOCAB)} if family == "sensevoice" else None
        save_file(tensors, paths[family], metadata=meta)
    wav = folder / "audio.wav"
    write_wav(wav, rng.uniform(-0.3, 0.3, size=frames * 640))
    return FeatureClip(
        clip_id=clip_id,
        num_frames=frames,
        paths=paths,
        sampling_weight=weight,
        audio_path=str(wav),
    )


def layout(audio: str = "hubert") -> DataLayout:
    shapes = {"vae_latents": [C, H, W], "hubert": [2, AUDIO_DIM], "sensevoice": [AUDIO_DIM]}
    return DataLayout(shapes={k: shapes[k] for k in ("vae_latents", audio)})


def memory_bank(clips: list[FeatureClip], path: Path, vocab: int = 16) -> Path:
    """A bank in the engram stage's format (k-means replaced by frames as centroids)."""
    from safetensors.torch import load_file

    hub = [load_file(c.paths["hubert"])["features"].numpy() for c in clips]
    lat = [load_file(c.paths["vae_latents"])["latents"].float() for c in clips]
    frames = np.concatenate([h.mean(1) for h in hub])
    codebook = frames[np.linspace(0, len(frames) - 1, vocab).astype(int)]
    orders, heads, table = [2, 3], 4, 257
    primes = make_primes(table, len(orders), heads)
    offsets = np.concatenate([[0], np.cumsum(primes.reshape(-1))[:-1]]).reshape(primes.shape)
    bank = {
        "codebook": torch.from_numpy(codebook).float(),
        "multipliers": torch.from_numpy(make_multipliers(0, max(orders), vocab + 1)),
        "orders": torch.tensor(orders),
        "primes": torch.from_numpy(primes),
        "offsets": torch.from_numpy(offsets.astype(np.int64)),
        "pad_id": torch.tensor([vocab]),
    }
    total = int(primes.sum())
    values = torch.zeros(total, C, H - H // 2, W)
    counts = torch.zeros(total, dtype=torch.int64)
    uni = torch.zeros(vocab, C, H - H // 2, W)
    uni_counts = torch.zeros(vocab, dtype=torch.int64)
    for h, la in zip(hub, lat, strict=True):
        codes = assign_codes(bank["codebook"], h)
        idx = torch.from_numpy(flat_indices(bank, codes))
        mouth = la[:, :, H // 2 :]
        for j in range(idx.shape[1]):
            values.index_add_(0, idx[:, j], mouth)
            counts.index_add_(0, idx[:, j], torch.ones(len(codes), dtype=torch.int64))
        uni.index_add_(0, torch.from_numpy(codes), mouth)
        uni_counts.index_add_(0, torch.from_numpy(codes), torch.ones(len(codes), dtype=torch.int64))
    bank["table_values"] = values / counts.clamp_min(1)[:, None, None, None]
    bank["table_counts"] = counts
    bank["unigram_values"] = uni / uni_counts.clamp_min(1)[:, None, None, None]
    bank["unigram_counts"] = uni_counts
    bank["global_mean"] = torch.cat(lat)[:, :, H // 2 :].mean(0)
    save_file({k: v.contiguous() for k, v in bank.items()}, str(path))
    return path
