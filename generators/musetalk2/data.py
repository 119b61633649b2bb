"""Training and sampling data of the ``musetalk2`` family, read from the feature cache only.

Per clip (held in memory: latents fp16 plus small per-frame arrays; no video is decoded):

- ``vae_latents/latents`` ``(T, C, h, w)``: targets and references;
- audio: ``sensevoice/features`` ``(T_s, D)`` + ``sensevoice/frame_index`` ``(T,)``, or
  ``hubert/features`` ``(T, 2, D)`` (see :mod:`generators.musetalk2.audio`);
- with Engram: ``hubert/features`` → the memory bank's k-means code per frame → hashed
  table rows ``(T, orders·heads)`` under the bank's hashing (which the network adopts);
  or, with ``engram.keys: ctc``, ``sensevoice/ctc_tokens`` ``(T,)`` → rows under the
  module's own hashing;
- with IFS references: ``liveportrait_motion/motion`` (pitch, yaw, roll) and
  ``emoca_flame/flame`` (jaw rotation, expression) (see :mod:`generators.musetalk2.sampling`);
- with the sync loss: the clip's wav (``FeatureClip.audio_path``) → Wav2Lip mel.

A batch row is one frame; a sample is ``n_sample_frames`` consecutive rows. Noise, ``(t, r)``
and everything else random come from ``(seed, step)`` (per sample, shared by its frames).
"""

from __future__ import annotations

import math
import wave
from dataclasses import dataclass

import numpy as np
import torch

from generators.blocks.config import EngramConfig, PMFConfig
from generators.blocks.engram import engram_rows, own_hashing
from generators.blocks.engram_hash import assign_codes, make_primes
from generators.blocks.pmf import sample_times
from generators.family_config import FeatureClip
from generators.io import read_metadata, read_tensor, tensor_shape
from generators.musetalk2.audio import audio_tokens
from generators.musetalk2.config import Musetalk2Spec, engram_config
from generators.musetalk2.sampling import ClipMeta, SamplePick, mouth_descriptor, mouth_mask
from models.emoca import FLAME_SLICES
from models.liveportrait import motion_slices
from models.stable_syncnet import MEL_FPS, SAMPLE_RATE_HZ, mel_window, melspectrogram

LATENTS, SENSEVOICE, HUBERT = "vae_latents", "sensevoice", "hubert"
MOTION, FLAME = "liveportrait_motion", "emoca_flame"
TENSORS = {LATENTS: "latents", SENSEVOICE: "features", HUBERT: "features"}
TENSORS |= {MOTION: "motion", FLAME: "flame"}
FRAME_INDEX, CTC_TOKENS = "frame_index", "ctc_tokens"


def engram_keys(spec_or_config) -> str | None:
    """Which feature keys the Engram module (``None``: Engram off)."""
    engram = spec_or_config.engram
    return engram.keys if engram.enabled else None


def needed_features(audio: str, keys: str | None, ifs: bool) -> dict[str, str]:
    """Feature files read (name → main tensor) for an audio kind, Engram keys, IFS."""
    key_file = {"kmeans": [HUBERT], "ctc": [SENSEVOICE]}.get(keys or "", [])
    names = [LATENTS, audio] + key_file + ([MOTION, FLAME] if ifs else [])
    return {n: TENSORS[n] for n in dict.fromkeys(names)}


def needed_extra(audio: str, keys: str | None) -> dict[str, tuple[str, ...]]:
    """Further tensors of those files: SenseVoice's frame index, CTC tokens."""
    extra = (FRAME_INDEX,) if audio == SENSEVOICE else ()
    extra += (CTC_TOKENS,) if keys == "ctc" else ()
    return {SENSEVOICE: extra} if extra else {}


def ctc_codes(
    tokens: torch.Tensor | np.ndarray, frames: int, cfg: EngramConfig, what: str
) -> np.ndarray:
    """CTC tokens of the first ``frames`` frames as Engram codes; ``ValueError`` when the
    clip has fewer or the ids do not fit ``engram.vocab_size``."""
    codes = np.asarray(tokens, dtype=np.int64)
    if codes.ndim != 1 or len(codes) < frames:
        raise ValueError(f"{what}: {codes.shape} ctc_tokens for {frames} frames")
    codes = codes[:frames]
    if codes.size and (codes.min() < 0 or codes.max() >= cfg.vocab_size):
        raise ValueError(
            f"{what}: CTC token {int(codes.max())} outside engram.vocab_size {cfg.vocab_size}:"
            " set it to the SenseVoice vocabulary (the file's ctc_vocab_size)"
        )
    return codes


def own_rows(codes: np.ndarray, cfg: EngramConfig) -> np.ndarray:
    """Table rows under the module's own hashing (no memory bank adopted)."""
    return engram_rows(codes, *own_hashing(cfg), cfg)


def head_pose(motion: torch.Tensor) -> np.ndarray:
    sl = motion_slices()
    cols = [motion[:, sl[k]] for k in ("pitch", "yaw", "roll")]
    return torch.cat(cols, 1).double().numpy()


def mouth_shape(flame: torch.Tensor) -> np.ndarray:
    jaw = flame[:, FLAME_SLICES["pose"]][:, 3:6]
    return mouth_descriptor(jaw.double().numpy(), flame[:, FLAME_SLICES["expression"]].numpy())


def check_bank(bank: dict[str, torch.Tensor], cfg: EngramConfig) -> None:
    """``ValueError`` unless the bank was built with this Engram geometry."""
    want = make_primes(cfg.table_size, len(cfg.orders), cfg.heads_per_order)
    got = {
        "vocab_size": int(bank["codebook"].shape[0]),
        "orders": bank["orders"].tolist(),
        "primes": bank["primes"].tolist(),
    }
    expect = {"vocab_size": cfg.vocab_size, "orders": list(cfg.orders), "primes": want.tolist()}
    if got != expect:
        raise ValueError(
            f"memory bank {got} does not match musetalk2 engram {expect}: set engram.vocab_size"
            " / orders / heads_per_order / table_size to the engram stage's codebook_size /"
            " ngram_orders / num_heads / table_size"
        )


def bank_rows(bank: dict[str, torch.Tensor], codes: np.ndarray, cfg: EngramConfig) -> np.ndarray:
    return engram_rows(
        codes, bank["multipliers"].numpy(), bank["primes"].numpy(), bank["offsets"].numpy(), cfg
    )


def read_wav(path: str) -> np.ndarray:
    """16 kHz mono 16-bit PCM wav → float samples in [-1, 1]."""
    with wave.open(path, "rb") as w:
        if w.getframerate() != SAMPLE_RATE_HZ or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16 kHz mono 16-bit PCM")
        raw = w.readframes(w.getnframes())
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


@dataclass
class ClipData:
    clip_id: str
    latents: torch.Tensor  # (T, C, h, w) fp16
    audio: torch.Tensor  # (T_s, D) or (T, S, D)
    frame_index: torch.Tensor | None  # (T,) SenseVoice row per frame
    rows: torch.Tensor | None  # (T, R) Engram table rows
    mel: np.ndarray | None  # (80, M) Wav2Lip mel of the clip's audio
    fps: float
    meta: ClipMeta


@dataclass
class TrainingData:
    spec: Musetalk2Spec
    clips: list[ClipData]
    bank: dict[str, torch.Tensor] | None
    pmf: PMFConfig
    mel_columns: int | None


def read_clip(
    clip: FeatureClip,
    spec: Musetalk2Spec,
    bank: dict[str, torch.Tensor] | None,
    mel_columns: int | None,
) -> ClipData:
    """One clip's tensors, checked against the spec; ``ValueError`` when they do not fit."""
    ifs = spec.sampling.reference == "ifs"
    need = needed_features(spec.audio, engram_keys(spec), ifs)
    lat = read_tensor(clip.paths[LATENTS], TENSORS[LATENTS]).to(torch.float16)
    t = lat.shape[0]
    want = (spec.latent_channels, spec.latent_height, spec.latent_width)
    if tuple(lat.shape[1:]) != want:
        raise ValueError(f"{clip.clip_id}: latents {tuple(lat.shape[1:])}, spec wants {want}")
    audio = read_tensor(clip.paths[spec.audio], TENSORS[spec.audio])
    frame_index = None
    if spec.audio == SENSEVOICE:
        frame_index = read_tensor(clip.paths[SENSEVOICE], FRAME_INDEX).long()
        if len(frame_index) != t:
            raise ValueError(f"{clip.clip_id}: {len(frame_index)} sensevoice frames vs {t}")
    elif audio.shape[0] != t:
        raise ValueError(f"{clip.clip_id}: {audio.shape[0]} hubert frames vs {t} latents")
    if audio.shape[-1] != spec.audio_dim:
        raise ValueError(f"{clip.clip_id}: audio width {audio.shape[-1]} vs {spec.audio_dim}")
    rows = None
    if engram_keys(spec) == "ctc":
        path, cfg = clip.paths[SENSEVOICE], engram_config(spec)
        try:
            tensor_shape(path, CTC_TOKENS)
        except KeyError as err:  # features made before the stage stored the tokens
            raise ValueError(f"{clip.clip_id}: {err.args[0]}") from err
        vocab = read_metadata(path).get("ctc_vocab_size")
        if vocab is not None and int(vocab) != cfg.vocab_size:
            raise ValueError(
                f"{clip.clip_id}: SenseVoice vocabulary {vocab} != engram.vocab_size"
                f" {cfg.vocab_size}: set engram.vocab_size to {vocab}"
            )
        codes = ctc_codes(read_tensor(path, CTC_TOKENS), t, cfg, clip.clip_id)
        rows = torch.from_numpy(own_rows(codes, cfg))
    elif engram_keys(spec) == "kmeans":
        if bank is None:
            raise ValueError("musetalk2 with Engram trains with a memory bank")
        codes = assign_codes(bank["codebook"], read_tensor(clip.paths[HUBERT], "features").numpy())
        rows = torch.from_numpy(bank_rows(bank, codes, engram_config(spec)))
    pose = mouth = None
    if ifs and MOTION in need:
        pose = head_pose(read_tensor(clip.paths[MOTION], TENSORS[MOTION]).float())
        mouth = mouth_shape(read_tensor(clip.paths[FLAME], TENSORS[FLAME]).float())
        if len(pose) != t or len(mouth) != t:
            raise ValueError(f"{clip.clip_id}: motion/flame frames {len(pose)}/{len(mouth)} vs {t}")
    mel, fps, max_start = None, 25.0, t - spec.n_sample_frames
    if mel_columns is not None:
        if not clip.audio_path:
            raise ValueError(f"{clip.clip_id}: the sync loss needs the clip's wav (audio_path)")
        samples = read_wav(clip.audio_path)
        fps = t * SAMPLE_RATE_HZ / max(1, len(samples))
        mel = melspectrogram(samples)
        max_start = min(max_start, math.floor((mel.shape[1] - mel_columns) * fps / MEL_FPS))
    meta = ClipMeta(t, clip.sampling_weight, pose, mouth, max_start)
    return ClipData(clip.clip_id, lat, audio, frame_index, rows, mel, fps, meta)


def conditioning(
    clip: ClipData,
    frames: torch.Tensor,
    references: torch.Tensor,
    mask_rows: torch.Tensor,
    window: int,
) -> dict[str, torch.Tensor]:
    """Rows of one clip: target, reference, mask, audio tokens (+ engram rows), float32."""
    _, _, h, w = clip.latents.shape
    masks = np.stack([mouth_mask(h, w, int(m)) for m in mask_rows.tolist()])
    out = {
        "target": clip.latents[frames].float(),
        "reference": clip.latents[references].float(),
        "mask": torch.from_numpy(masks),
        "audio": audio_tokens(clip.audio, frames, window, clip.frame_index),
    }
    if clip.rows is not None:
        out["engram_rows"] = clip.rows[frames]
    return out


def step_noise(
    seed: int, step: int, n_samples: int, frames: int, shape: tuple[int, ...], cfg: PMFConfig
):
    """``(noise (N·F, ...), t (N·F,), r (N·F,))`` of the global batch: one ``(t, r)`` per
    sample, shared by its frames."""
    state = np.random.SeedSequence([seed, step, 1]).generate_state(1)[0]
    gen = torch.Generator().manual_seed(int(state))
    t, r = sample_times(n_samples, cfg, gen)
    noise = torch.randn((n_samples * frames, *shape), generator=gen)
    return noise, t.repeat_interleave(frames), r.repeat_interleave(frames)


def make_batch(data: TrainingData, picks: list[SamplePick], noise, t, r) -> dict[str, torch.Tensor]:
    """The batch of ``picks`` (already this rank's slice; noise/t/r sliced to match)."""
    spec, frames = data.spec, data.spec.n_sample_frames
    parts: list[dict[str, torch.Tensor]] = []
    mels = []
    for p in picks:
        clip = data.clips[p.clip]
        idx = torch.arange(p.start, p.start + frames)
        rows = torch.full((frames,), p.mask_rows)
        parts.append(conditioning(clip, idx, torch.tensor(p.references), rows, spec.audio_window))
        if data.mel_columns is not None:
            win = mel_window(clip.mel, p.start, clip.fps, data.mel_columns)
            mels.append(torch.from_numpy(np.ascontiguousarray(win))[None])
    batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    batch |= {"noise": noise, "t": t, "r": r, "frames": torch.tensor(frames)}
    batch["dms_margin_px"] = torch.tensor([p.margin_px for p in picks])
    if mels:
        batch["mel"] = torch.stack(mels)
    return batch
