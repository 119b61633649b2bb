"""Engram stage: a hashed n-gram viseme memory bank built from the training clips.

Engram (DeepSeek, "Conditional Memory via Scalable Lookup") keys a large embedding table
by hashed n-grams of discrete tokens. Here the tokens are **audio codes**: a seeded k-means
codebook over per-frame HuBERT features (the mean of the two 50 Hz steps of each 25 fps
frame) turns every video frame into one code. The n-grams of codes (orders
``ngram_orders``, causal, left-padded per clip) are hashed into ``num_heads`` prime-sized
tables per order (see :mod:`generators.blocks.engram_hash`), and each slot stores the **mean
mouth-region VAE latent** (lower half of the latent rows) of the training frames that
landed there, plus per-code unigram means. The bank is family-independent data: a model
family that uses it (``ModelFamily.uses_memory_bank``) reads it with
``engram_hash.read_bank`` and calls ``lookup`` for a retrieved mouth prior of any code
sequence (``musetalk15``: input channels).

Only training clips contribute (``accepts`` rejects held-out clips), so evaluation clips
never leak into the prior. Results do not depend on the order items arrive in: clips are
processed sorted by id, k-means is seeded. Memory: the fitted audio features of all
training frames (``frames × D`` float32, subsampled to ``kmeans_max_frames`` for the fit)
plus the value tables, ``Σ primes × C × h/2 × w`` accumulated in float64 and stored as
float32 (≈ 140 MB while building and 70 MB on disk for the defaults at 256 px crops);
latents are read one clip at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from safetensors import safe_open

from tasks.base import (
    AggregateInputs,
    FailureKind,
    ItemContext,
    ItemFailure,
    Record,
    Stage,
    StageConfig,
)
from tasks.engram_config import EngramConfig
from tasks.records import ClipFeatures, MemoryBank
from tasks.split import is_heldout

if TYPE_CHECKING:
    import torch


def mouth_region(latents: torch.Tensor, rows: str = "lower_half") -> torch.Tensor:
    """The mouth part of latents ``(..., h, w)``: rows ``h//2:`` for ``lower_half``."""
    if rows != "lower_half":
        raise ValueError(f"unknown mouth_rows {rows!r}")
    return latents[..., latents.shape[-2] // 2 :, :]


def _mouth_shape(latent_shape: list[int], rows: str) -> list[int]:
    """Per-frame value shape ``[C, h_mouth, w]`` for latents declared as ``[T, C, h, w]``."""
    if len(latent_shape) != 4:
        raise ItemFailure(FailureKind.FORMAT, f"latents declared as {latent_shape}, not T,C,h,w")
    import torch

    probe = torch.empty(0, *latent_shape[1:])
    return list(mouth_region(probe, rows).shape[1:])


def fit_codebook(features: np.ndarray, size: int, seed: int, iters: int) -> np.ndarray:
    """Seeded k-means (k-means++ init, one run) over ``(N, D)`` features → ``(size, D)``."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=size, n_init=1, max_iter=iters, random_state=seed)
    km.fit(np.asarray(features, dtype=np.float32))
    return km.cluster_centers_.astype(np.float32)


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    except Exception as exc:  # safetensors raises several types for bad files
        raise ItemFailure(FailureKind.FORMAT, f"{path.name}: cannot read {name!r}: {exc}") from exc


class EngramStage(Stage[EngramConfig]):
    """Builds the memory bank from all training clips' features (one aggregate output)."""

    name: ClassVar[str] = "engram"
    code_version: ClassVar[str] = "1"
    requires: ClassVar[tuple[str, ...]] = ("features",)
    aggregate: ClassVar[bool] = True
    config_type: ClassVar[type[StageConfig]] = EngramConfig
    uses_split: ClassVar[bool] = True  # held-out clips never train (tasks.split)

    def accepts(self, item_id: str, shared: dict[str, Record]) -> bool:
        return not is_heldout(item_id, self.env)

    def process(self, inputs: AggregateInputs, ctx: ItemContext) -> MemoryBank:
        import torch

        from generators.blocks.engram_hash import (
            collision_rates,
            hash_ngrams,
            make_multipliers,
            make_primes,
            ngram_context,
        )
        from models.safetensors_io import save_file

        cfg = self.config
        clips = sorted(
            (it.item_id, it.get("features", ClipFeatures))
            for it in inputs.items
            if not is_heldout(it.item_id, self.env)
        )
        if not clips:
            raise ItemFailure(FailureKind.FORMAT, "engram: no training clips with features")
        _check_same_models(clips)

        codebook, codes = self._audio_codes(clips, ctx)

        # (b) hashing parameters, as in the Engram demo
        k = cfg.codebook_size
        orders = cfg.ngram_orders
        primes = make_primes(cfg.table_size, len(orders), cfg.num_heads)
        offsets = np.concatenate([[0], np.cumsum(primes.ravel())[:-1]]).reshape(primes.shape)
        multipliers = make_multipliers(cfg.seed, max(orders), vocab_size=k + 1)
        total_slots = int(primes.sum())

        # (c) values: mean mouth latent per slot and per code, read one clip at a time
        value_shape = _mouth_shape(clips[0][1].file("vae_latents").shape, cfg.mouth_rows)
        sums = torch.zeros(total_slots, *value_shape, dtype=torch.float64)
        uni_sums = torch.zeros(k, *value_shape, dtype=torch.float64)
        counts = torch.zeros(total_slots, dtype=torch.int64)
        uni_counts = torch.zeros(k, dtype=torch.int64)
        ngram_rows: dict[int, list[np.ndarray]] = {n: [] for n in orders}
        ngram_slots: dict[int, list[np.ndarray]] = {n: [] for n in orders}
        for (clip_id, feats), c in zip(clips, codes, strict=True):
            lat = _read_tensor(ctx.local_path(feats.file("vae_latents").artifact), "latents")
            if lat.ndim != 4 or lat.shape[0] != c.shape[0]:
                raise ItemFailure(
                    FailureKind.MISALIGNED,
                    f"{clip_id}: latents {tuple(lat.shape)} for {c.shape[0]} audio frames",
                )
            mouth = mouth_region(lat.double(), cfg.mouth_rows).contiguous()
            if list(mouth.shape[1:]) != value_shape:
                raise ItemFailure(
                    FailureKind.FORMAT,
                    f"{clip_id}: latent mouth shape {list(mouth.shape[1:])} != {value_shape}",
                )
            idx = hash_ngrams(c, multipliers, primes, orders, pad_id=k)  # (T, O, H)
            flat = torch.from_numpy((idx + offsets[None]).reshape(len(c), -1))
            for j in range(flat.shape[1]):
                sums.index_add_(0, flat[:, j], mouth)
                counts += torch.bincount(flat[:, j], minlength=total_slots)
            ct = torch.from_numpy(c)
            uni_sums.index_add_(0, ct, mouth)
            uni_counts += torch.bincount(ct, minlength=k)
            for o, n in enumerate(orders):
                ngram_rows[n].append(ngram_context(c, n, pad_id=k))
                ngram_slots[n].append(idx[:, o, :])

        def means(s: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            denom = n.clamp(min=1).double().view(-1, *([1] * len(value_shape)))
            return (s / denom).float()

        num_frames = int(uni_counts.sum())
        bank = {
            "codebook": torch.from_numpy(codebook),
            "multipliers": torch.from_numpy(multipliers),
            "orders": torch.tensor(orders, dtype=torch.int64),
            "primes": torch.from_numpy(primes),
            "offsets": torch.from_numpy(offsets.astype(np.int64)),
            "pad_id": torch.tensor([k], dtype=torch.int64),
            "table_values": means(sums, counts),
            "table_counts": counts,
            "unigram_values": means(uni_sums, uni_counts),
            "unigram_counts": uni_counts,
            "global_mean": (uni_sums.sum(0) / max(1, num_frames)).float(),
        }

        occupied: dict[str, int] = {}
        collision: dict[str, float] = {}
        per_head: dict[str, float] = {}
        for o, n in enumerate(orders):
            lo = int(offsets[o, 0])
            hi = lo + int(primes[o].sum())
            occupied[str(n)] = int((counts[lo:hi] > 0).sum())
            rows = np.concatenate(ngram_rows[n])
            _, first = np.unique(rows, axis=0, return_index=True)
            slots = np.concatenate(ngram_slots[n])[first]
            collision[str(n)], per_head[str(n)] = collision_rates(slots)

        first_files = clips[0][1]
        meta = {
            "config": json.dumps(cfg.model_dump(mode="json", exclude={"resources"})),
            "mouth_rows": cfg.mouth_rows,
            "value_shape": json.dumps(value_shape),
            "num_clips": str(len(clips)),
            "num_frames": str(num_frames),
            "collision_rate_all_heads": json.dumps(collision),
            "collision_rate_per_head": json.dumps(per_head),
            "vae_sha256": first_files.file("vae_latents").model.sha256,
            "hubert_sha256": first_files.file("hubert").model.sha256,
            "audio_key": "kmeans over mean of the 2 HuBERT steps per frame",
        }
        path = ctx.scratch / "memory_bank.safetensors"
        save_file({key: t.contiguous() for key, t in bank.items()}, str(path), metadata=meta)
        ref = ctx.commit(path, "memory_bank.safetensors", kind="memory_bank")
        return MemoryBank(
            bank=ref,
            num_clips=len(clips),
            num_frames=num_frames,
            codebook_size=k,
            ngram_orders=list(orders),
            table_size=cfg.table_size,
            value_shape=value_shape,
            used_codes=int((uni_counts > 0).sum()),
            occupied_slots=occupied,
            collision_rate=collision,
        )

    def _audio_codes(
        self, clips: list[tuple[str, ClipFeatures]], ctx: ItemContext
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(a) Seeded k-means over per-frame audio features; one code per video frame."""
        from generators.blocks.engram_hash import assign_codes

        cfg = self.config
        audio: list[np.ndarray] = []
        for clip_id, feats in clips:
            x = _read_tensor(ctx.local_path(feats.file("hubert").artifact), "features")
            if x.ndim != 3 or x.shape[0] != feats.num_frames or x.shape[1] != 2:
                raise ItemFailure(
                    FailureKind.MISALIGNED,
                    f"{clip_id}: hubert features {tuple(x.shape)} for {feats.num_frames} frames",
                )
            audio.append(x.float().mean(dim=1).numpy())
        if len({a.shape[1] for a in audio}) != 1:
            raise ItemFailure(FailureKind.FORMAT, "engram: clips have different HuBERT widths")
        all_audio = np.concatenate(audio)
        if all_audio.shape[0] < cfg.codebook_size:
            raise ItemFailure(
                FailureKind.FORMAT,
                f"engram: {all_audio.shape[0]} training frames < codebook_size {cfg.codebook_size}",
            )
        fit_rows = all_audio
        if all_audio.shape[0] > cfg.kmeans_max_frames:
            rng = np.random.default_rng(cfg.seed)
            pick = np.sort(rng.choice(all_audio.shape[0], cfg.kmeans_max_frames, replace=False))
            fit_rows = all_audio[pick]
        codebook = fit_codebook(fit_rows, cfg.codebook_size, cfg.seed, cfg.kmeans_iters)
        codes = [assign_codes(codebook, a) for a in audio]
        return codebook, codes


def _check_same_models(clips: list[tuple[str, ClipFeatures]]) -> None:
    """All clips must come from one VAE and one HuBERT, or their codes and values mix spaces."""
    for family in ("vae_latents", "hubert"):
        try:
            shas = {f.file(family).model.sha256 for _, f in clips}
        except KeyError as exc:
            raise ItemFailure(FailureKind.FORMAT, f"engram: {exc.args[0]}") from exc
        if len(shas) > 1:
            raise ItemFailure(
                FailureKind.FORMAT, f"engram: {family} features come from {len(shas)} models"
            )
