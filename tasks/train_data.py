"""Training data for the latent UNet: the manifest the train stage hands its workers, clip
loading, deterministic per-step sampling and batch assembly.

One sample is one frame ``t`` of one training clip:

- target: the frame's own VAE latents ``(C, h, w)`` (the loss is MSE in latent space);
- input: the target with its lower half zeroed, reference latents from another frame
  ``r`` of the same clip with ``|r - t| > MIN_REF_GAP_FRAMES`` (MuseTalk rejects closer ones
  so the mouth cannot be copied), and the Engram prior for the clip's audio codes;
- audio: the HuBERT window of frames ``t-w .. t+w`` (see :func:`models.unet.audio_window_tokens`).

**Determinism and resume.** The frames of step ``s`` are drawn from a generator seeded by
``(seed, s)`` alone, and each rank takes its slice of that global batch. There is no data
loader state to checkpoint: a run resumed at step ``N`` sees exactly the batches an
uninterrupted run would, so checkpoints carry no RNG state.

**Memory.** Clips are held in memory (latents fp16, HuBERT, and the Engram prior, about
1.5 × the latents): right for the small models trained here; a large corpus would stream
from the safetensors files instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from safetensors import safe_open
from safetensors.torch import save_file

from generators.blocks.engram_hash import BANK_KEYS, assign_codes, lookup
from models.unet import LatentUNetSpec, audio_window_tokens, make_spec, unet_input

MIN_REF_GAP_FRAMES = 5
MANIFEST_NAME = "manifest.json"
CHECKPOINT_NAME = "checkpoint.safetensors"
HISTORY_NAME = "history.jsonl"
RANKS_DIR = "ranks"


class ClipEntry(BaseModel):
    """One training clip's feature files (local paths) and their recorded shapes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip_id: str
    latents_path: str
    hubert_path: str
    latents_sha256: str
    hubert_sha256: str
    num_frames: int


class TrainManifest(BaseModel):
    """Everything a worker process needs; written as JSON by the train stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    work_dir: str
    clips: list[ClipEntry]
    bank_path: str
    bank_sha256: str
    latent_shape: list[int]  # (C, h, w)
    audio_steps: int
    audio_dim: int
    steps: int
    learning_rate: float
    batch_size: int  # per process
    num_processes: int
    checkpoint_every: int
    seed: int
    audio_window_frames: int
    unet: str  # "tiny"
    skipped: list[str] = []  # clips left out, with the reason (information only)

    def spec(self) -> LatentUNetSpec:
        c, h, _ = self.latent_shape
        return make_spec(
            c,
            self.audio_dim,
            h,
            tiny=self.unet == "tiny",
            audio_steps_per_frame=self.audio_steps,
            audio_window_frames=self.audio_window_frames,
        )

    def fingerprint(self) -> str:
        """Hash of what defines the training run (content hashes, not local paths)."""
        payload = self.model_dump(mode="json", exclude={"work_dir", "bank_path", "skipped"})
        for clip in payload["clips"]:
            clip.pop("latents_path")
            clip.pop("hubert_path")
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    @classmethod
    def read(cls, path: Path) -> TrainManifest:
        return cls.model_validate_json(path.read_text())


def tensor_shape(path: Path, name: str) -> list[int]:
    """Shape of tensor ``name`` in a safetensors file, from the header only."""
    with safe_open(str(path), framework="pt") as f:
        if name not in f.keys():  # noqa: SIM118 - safe_open has no __contains__
            raise KeyError(f"{path.name} has no tensor {name!r}")
        return list(f.get_slice(name).get_shape())


def read_tensor(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def read_bank(path: str | Path) -> dict[str, torch.Tensor]:
    """The memory bank's tensors, as ``tasks.engram.load_bank`` reads them.

    Read here rather than imported so training ranks and generation do not import the
    engram stage (and scikit-learn with it) just to look values up.
    """
    with safe_open(str(path), framework="pt") as f:
        bank = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    missing = [k for k in BANK_KEYS if k not in bank]
    if missing:
        raise ValueError(f"{path}: not a memory bank, missing {missing}")
    return bank


def engram_prior(bank: dict[str, torch.Tensor], hubert: torch.Tensor) -> torch.Tensor:
    """The bank's retrieved mouth prior ``(T, C, h_mouth, w)`` for a clip's own audio codes."""
    codes = assign_codes(bank["codebook"], hubert.float().numpy())
    return lookup(bank, codes).float()


@dataclass
class ClipTensors:
    clip_id: str
    latents: torch.Tensor  # (T, C, h, w) fp16
    hubert: torch.Tensor  # (T, S, D)
    prior: torch.Tensor  # (T, C, h_mouth, w) fp16

    @property
    def num_frames(self) -> int:
        return int(self.latents.shape[0])


def load_clips(manifest: TrainManifest) -> list[ClipTensors]:
    """Read every clip's latents and HuBERT features and compute its Engram prior."""
    bank = read_bank(manifest.bank_path)
    out: list[ClipTensors] = []
    for entry in manifest.clips:
        lat = read_tensor(Path(entry.latents_path), "latents").to(torch.float16)
        hub = read_tensor(Path(entry.hubert_path), "features")
        if lat.shape[0] != hub.shape[0]:
            raise ValueError(f"{entry.clip_id}: {lat.shape[0]} latent vs {hub.shape[0]} audio")
        prior = engram_prior(bank, hub)
        want = lat.shape[2] - lat.shape[2] // 2
        if prior.shape[1] != lat.shape[1] or prior.shape[2] != want:
            raise ValueError(
                f"{entry.clip_id}: bank prior {tuple(prior.shape[1:])} does not fit latents "
                f"{tuple(lat.shape[1:])}; was the bank built from the same VAE?"
            )
        out.append(ClipTensors(entry.clip_id, lat, hub, prior.to(torch.float16)))
    return out


def reference_frame(t: int, num_frames: int, u: float) -> int:
    """A frame ``r`` with ``|r - t| > MIN_REF_GAP_FRAMES`` chosen by ``u ∈ [0, 1)``.

    Uniform over the allowed frames; a clip too short to have any falls back to the
    farther end of the clip.
    """
    gap = MIN_REF_GAP_FRAMES
    allowed = [r for r in (range(0, t - gap), range(t + gap + 1, num_frames)) if len(r)]
    total = sum(len(r) for r in allowed)
    if total == 0:
        return 0 if t >= num_frames - 1 - t else num_frames - 1
    k = min(int(u * total), total - 1)
    for r in allowed:
        if k < len(r):
            return r[k]
        k -= len(r)
    raise AssertionError("unreachable")


def step_picks(
    frame_counts: list[int], seed: int, step: int, global_batch: int
) -> list[tuple[int, int, int]]:
    """``(clip, frame, reference)`` triples of one step's global batch, from ``(seed, step)``.

    Frames are uniform over all frames of all clips (long clips count more).
    """
    rng = np.random.default_rng([seed, step])
    offsets = np.cumsum([0, *frame_counts])
    flat = rng.integers(0, offsets[-1], size=global_batch)
    us = rng.random(global_batch)
    picks = []
    for f, u in zip(flat.tolist(), us.tolist(), strict=True):
        clip = int(np.searchsorted(offsets, f, side="right") - 1)
        t = f - int(offsets[clip])
        picks.append((clip, t, reference_frame(t, frame_counts[clip], u)))
    return picks


def make_batch(
    clips: list[ClipTensors], picks: list[tuple[int, int, int]], window_frames: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(model_input (N, 3C, h, w), audio_tokens (N, K, D), target (N, C, h, w))`` float32."""
    target, ref, prior, tokens = [], [], [], []
    for c, t, r in picks:
        clip = clips[c]
        target.append(clip.latents[t])
        ref.append(clip.latents[r])
        prior.append(clip.prior[t])
        tokens.append(audio_window_tokens(clip.hubert, torch.tensor([t]), window_frames)[0])
    tgt = torch.stack(target).float()
    x = unet_input(tgt, torch.stack(ref).float(), torch.stack(prior).float())
    return x, torch.stack(tokens), tgt


# ---------------------------------------------------------------------------- checkpoints


@dataclass
class CheckpointState:
    """A training checkpoint read back from safetensors (no pickle anywhere)."""

    step: int
    manifest_fingerprint: str
    model: dict[str, torch.Tensor]
    optimizer: dict  # torch optimizer ``state_dict()`` layout


def save_checkpoint(
    path: Path,
    step: int,
    manifest_fingerprint: str,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    spec: LatentUNetSpec,
) -> None:
    """Write model weights and flattened optimizer state to one safetensors file, atomically.

    Optimizer tensors become ``optim.<param index>.<key>`` (``step``, ``exp_avg``, …); the
    param groups (hyper-parameters, JSON-safe) and the step go into the header metadata.
    The file is written under a temporary name in the same folder and renamed over the
    previous checkpoint, so a reader sees either the old or the new one, whole.
    """
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model_state.items()}
    for idx, state in optimizer_state["state"].items():
        for key, value in state.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"optim.{idx}.{key}"] = t.detach().contiguous().cpu()
    meta = {
        "step": step,
        "manifest_fingerprint": manifest_fingerprint,
        "param_groups": optimizer_state["param_groups"],
        "model_spec": json.loads(spec.to_json()),
        "format": 1,
    }
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file(tensors, str(tmp), metadata={"talkforge_state": json.dumps(meta)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint_meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["talkforge_state"])


def load_checkpoint(path: Path) -> CheckpointState:
    meta = read_checkpoint_meta(path)
    model: dict[str, torch.Tensor] = {}
    optim_state: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no iter
            kind, _, rest = key.partition(".")
            if kind == "model":
                model[rest] = f.get_tensor(key)
            elif kind == "optim":
                idx, _, name = rest.partition(".")
                optim_state.setdefault(int(idx), {})[name] = f.get_tensor(key)
    return CheckpointState(
        step=int(meta["step"]),
        manifest_fingerprint=str(meta["manifest_fingerprint"]),
        model=model,
        optimizer={"state": optim_state, "param_groups": meta["param_groups"]},
    )
