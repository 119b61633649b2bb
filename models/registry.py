"""Model references in config, tiny random models for offline runs, and weight fingerprints.

A :class:`ModelSpec` names weights the way their official loader expects: a hub id or a
local directory/file. With ``tiny_random: true`` the directory is created on first use
from a small config through the model family's registered builder, then loaded back
through the same official loading path as real weights (``from_pretrained(dir)``,
``load_state_dict``). Such a directory carries ``talkforge_provenance.json`` so every
artifact made from it is labelled ``random-init`` in the catalog.

Fingerprints hash the weight files (sha256), cached by (path, size, mtime) so a 1 GB
checkpoint is not re-hashed on every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from models.fingerprint import ModelFingerprint

PROVENANCE_FILE = "talkforge_provenance.json"
WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".model", ".zip", ".yaml", ".mvn"
)  # fmt: skip

TinyBuilder = Callable[[Path, int], None]
_TINY_BUILDERS: dict[str, TinyBuilder] = {}


class ModelSpec(BaseModel):
    """A model as configured: family (loader), weights source and options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: str  # e.g. "vae-flux1", "vae-sd", "hubert"
    source: str  # hub id (org/name) or local path; relative paths are under data_root
    subfolder: str | None = None
    revision: str | None = None
    tiny_random: bool = False  # build a tiny random model at ``source`` if it is missing
    seed: int = 0


class ModelUnavailableError(RuntimeError):
    """Weights a run needs are not where the config says; the message says how to fix it."""


def hf_load_kwargs(
    path_or_hub_id: str | Path, subfolder: str | None = None, revision: str | None = None
) -> dict[str, object]:
    """``from_pretrained`` keywords: local paths and ``HF_HUB_OFFLINE=1`` never fetch."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    offline = flag in {"1", "true", "yes", "on"}
    kwargs: dict[str, object] = {"local_files_only": Path(path_or_hub_id).exists() or offline}
    if subfolder:
        kwargs["subfolder"] = subfolder
    if revision:
        kwargs["revision"] = revision
    return kwargs


def register_tiny_builder(family: str) -> Callable[[TinyBuilder], TinyBuilder]:
    """Decorator: ``builder(directory, seed)`` writes a tiny model loadable by the real loader."""

    def deco(fn: TinyBuilder) -> TinyBuilder:
        _TINY_BUILDERS[family] = fn
        return fn

    return deco


def resolve_source(spec: ModelSpec, data_root: Path) -> Path | None:
    """Local path for a spec, or None when it is a hub id (org/name without a local match)."""
    p = Path(spec.source).expanduser()
    if not p.is_absolute():
        candidate = data_root / p
        if candidate.exists() or spec.tiny_random or spec.source.startswith("."):
            p = candidate
        elif "/" in spec.source and not p.exists():
            return None
    return p


def ensure_model(spec: ModelSpec, data_root: Path) -> Path | None:
    """Make sure a local model exists (building a tiny one if asked); return its path."""
    path = resolve_source(spec, data_root)
    if path is None or path.exists():
        return path
    if not spec.tiny_random:
        raise ModelUnavailableError(
            f"model {spec.family!r} not found at {path}; import the official weights with "
            f"`talkforge models import {spec.family} <file-or-folder>` (check with "
            f"`talkforge models list`), or set tiny_random: true for an offline smoke run"
        )
    builder = _load_builder(spec.family)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-model-", dir=path.parent))
    try:
        builder(tmp, spec.seed)
        (tmp / PROVENANCE_FILE).write_text(
            json.dumps({"origin": "random-init", "family": spec.family, "seed": spec.seed})
        )
        try:
            os.replace(tmp, path)
        except OSError:  # another worker built it first
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _load_builder(family: str) -> TinyBuilder:
    if family not in _TINY_BUILDERS:
        # builders register on import of their model module
        import importlib

        module = {
            "vae-flux1": "models.vae",
            "vae-sd": "models.vae",
            "vae-flux2": "models.vae",
            "hubert": "models.hubert",
            "whisper": "models.whisper",
            "syncnet": "models.syncnet",
            "liveportrait-motion": "models.liveportrait",
            "emoca": "models.emoca",
            "dinov2": "models.dinov2",
            "sensevoice": "models.sensevoice",
            "inception-fid": "models.inception_fid",
            "i3d": "models.i3d",
            "arcface": "models.arcface",
            "lpips-alex": "models.lpips_net",
            "lpips-vgg": "models.lpips_net",
            "vgg19": "models.vgg",
            "syncnet-latentsync": "models.stable_syncnet",
            "musetalk15-official": "models.musetalk15_official",
        }.get(family)
        if module:
            importlib.import_module(module)
    if family not in _TINY_BUILDERS:
        raise ModelUnavailableError(f"no tiny builder registered for model family {family!r}")
    return _TINY_BUILDERS[family]


def fingerprint(spec: ModelSpec, data_root: Path) -> ModelFingerprint:
    """Hash the weights a spec points to; hub ids without a local copy get a name-only print."""
    path = ensure_model(spec, data_root)
    if path is None:
        digest = hashlib.sha256(f"{spec.source}@{spec.revision}".encode()).hexdigest()
        return ModelFingerprint(
            name=spec.family,
            source=spec.source,
            resolved_path="",
            sha256=digest,
            origin="pretrained",
            detail="hub id, weights resolved by the hub cache at load time",
        )
    origin = "pretrained"
    prov = path / PROVENANCE_FILE if path.is_dir() else None
    if prov is not None and prov.exists():
        origin = json.loads(prov.read_text()).get("origin", "pretrained")
    return ModelFingerprint(
        name=spec.family,
        source=spec.source,
        resolved_path=str(path),
        sha256=_hash_weights(path),
        origin=origin,
    )


def _hash_weights(path: Path) -> str:
    files = (
        [path]
        if path.is_file()
        else sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith(".")
        )
    )
    h = hashlib.sha256()
    for f in files:
        rel = f.name if path.is_file() else str(f.relative_to(path))
        h.update(rel.encode())
        h.update(_cached_file_hash(f).encode())
    return h.hexdigest()


def _hash_cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "talkforge" / "weight-hashes.json"


def _cached_file_hash(f: Path) -> str:
    """sha256 of a weight file, remembered by (absolute path, size, mtime) in a user cache.

    The cache lives outside the weights folder (which may be read-only, e.g. inside a
    package) and never changes what is hashed.
    """
    st = f.stat()
    key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    cache = _hash_cache_path()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    known[key] = h.hexdigest()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    except OSError:
        pass  # unwritable cache: hash again next time
    return known[key]
