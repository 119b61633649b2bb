"""Weights management behind ``talkforge models``: list, import, verify, download.

Every stage declares its models as :class:`~models.registry.ModelSpec` (family, source, and
whether a tiny random stand-in may be built). This module answers, for a config:

- **list**: every model the selected stages need, where its weights are expected, and
  whether they are there (``present``), will be built as a tiny random model
  (``tiny-random``), are a hub id resolved by the hub cache (``hub``) or are ``missing``;
- **import**: copy official weights from a local file or folder (an offline cluster's
  share) to where the config expects them — copied under a temporary name, then renamed —
  and record their size and sha256 in a hidden sidecar (``.talkforge-import.json``; hidden
  files are never part of a weights fingerprint). A family listed in
  :data:`IMPORT_CONVERTERS` converts its official file instead of copying it (EMOCA's
  Lightning ``.ckpt`` → safetensors, see ``models.emoca.convert_for_import``);
- **verify**: re-hash the weights (no cache) and compare with the sidecar and, when given,
  an expected sha256;
- **download**: fetch a hub model into the hub cache with ``huggingface_hub`` when a hub
  is reachable (``HF_HUB_OFFLINE=1`` makes this fail clearly instead).

A run whose weights are missing stops in preflight, before anything runs, with the
``talkforge models import`` command that fixes it (see ``models.registry.ensure_model``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from models.registry import PROVENANCE_FILE, ModelSpec, resolve_source
from storage.store import sha256_file
from talkforge.config import PipelineConfig
from talkforge.stages import STAGE_ORDER, STAGES
from tasks.base import StageEnv

SIDECAR = ".talkforge-import.json"
# family -> module whose ``convert_for_import(source, out)`` converts official files
IMPORT_CONVERTERS = {"emoca": "models.emoca"}


@dataclass(frozen=True)
class NeededModel:
    stage: str
    spec: ModelSpec
    path: Path | None  # None: a hub id without a local copy

    @property
    def status(self) -> str:
        if self.path is None:
            return "hub"
        if self.path.exists():
            prov = self.path / PROVENANCE_FILE if self.path.is_dir() else None
            return "present (random-init)" if prov and prov.exists() else "present"
        return "tiny-random" if self.spec.tiny_random else "missing"


def needed_models(config: PipelineConfig, stages: list[str] | None = None) -> list[NeededModel]:
    """The models the given stages (default: all) need under ``config``."""
    env = StageEnv(data_root=str(config.data_root), store_uri=config.store_uri, run_id="models")
    out = []
    for stage in stages or STAGE_ORDER:
        for spec in STAGES[stage](config.stage(stage), env).model_specs():
            out.append(NeededModel(stage, spec, resolve_source(spec, config.data_root)))
    return out


def find_model(config: PipelineConfig, family: str, stage: str | None = None) -> NeededModel:
    matches = [m for m in needed_models(config) if m.spec.family == family]
    if stage:
        matches = [m for m in matches if m.stage == stage]
    if not matches:
        known = sorted({m.spec.family for m in needed_models(config)})
        raise KeyError(f"no model family {family!r} in this config; known: {known}")
    paths = {m.path for m in matches}
    if len(paths) > 1:
        raise KeyError(f"{family!r} is configured in several places; pass --stage")
    return matches[0]


def weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))


def hash_files(path: Path) -> dict[str, dict[str, int | str]]:
    """``{relative name: {size_bytes, sha256}}`` of every non-hidden file (no cache)."""
    out: dict[str, dict[str, int | str]] = {}
    for f in weight_files(path):
        rel = f.name if path.is_file() else str(f.relative_to(path))
        out[rel] = {"size_bytes": f.stat().st_size, "sha256": sha256_file(f)}
    return out


def _sidecar(path: Path) -> Path:
    return path / SIDECAR if path.is_dir() else path.parent / f".{path.name}{SIDECAR}"


def import_weights(model: NeededModel, source: Path, expected_sha256: str | None = None) -> dict:
    """Copy ``source`` (file or folder) to the model's expected path; returns the record.

    Refuses a hub-id model (nothing local to place), an existing destination (verify or
    remove it first) and a single file whose sha256 differs from ``expected_sha256``.
    """
    if model.path is None:
        raise ValueError(f"{model.spec.family} is a hub id ({model.spec.source}); use download")
    source = source.expanduser().resolve()
    if not source.exists():
        raise FileNotFoundError(f"nothing to import at {source}")
    dest = model.path
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; `talkforge models verify` checks it")
    files = hash_files(source)
    if expected_sha256 is not None:
        _check_expected(files, expected_sha256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-import-{uuid.uuid4().hex}-{dest.name}"
    converted = None
    try:
        converted = _convert(model.spec.family, source, tmp)
        if converted is None and source.is_dir():
            shutil.copytree(source, tmp)
        elif converted is None:
            shutil.copy2(source, tmp)
        os.replace(tmp, dest)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    record: dict = {"family": model.spec.family, "imported_from": str(source)}
    if converted is not None:  # the files are the converted ones; the source's hash is kept
        record |= {"source_files": files, "converted": converted}
        files = hash_files(dest)
    elif source.is_file():  # recorded under the name it has now
        files = {dest.name: next(iter(files.values()))}
    record["files"] = files
    _sidecar(dest).write_text(json.dumps(record, indent=2, sort_keys=True))
    return record


def _convert(family: str, source: Path, out: Path) -> dict | None:
    """Run the family's import converter, if it has one; None: copy ``source`` as it is."""
    if family not in IMPORT_CONVERTERS:
        return None
    import importlib

    from models.registry import ModelUnavailableError

    module = importlib.import_module(IMPORT_CONVERTERS[family])
    try:
        return module.convert_for_import(source, out)
    except ModelUnavailableError as exc:  # the CLI reports ValueErrors without a traceback
        raise ValueError(str(exc)) from exc


def _check_expected(files: dict[str, dict[str, int | str]], expected_sha256: str) -> None:
    if len(files) != 1:
        raise ValueError("--sha256 checks a single weights file, not a folder")
    actual = next(iter(files.values()))["sha256"]
    if actual != expected_sha256.lower():
        raise ValueError(f"sha256 mismatch: expected {expected_sha256}, got {actual}")


def verify_weights(model: NeededModel, expected_sha256: str | None = None) -> list[str]:
    """Problems found (empty when the weights match their import record and expectation)."""
    if model.path is None:
        return []
    if not model.path.exists():
        return [f"missing: {model.path}"]
    files = hash_files(model.path)
    problems = []
    if expected_sha256 is not None:
        try:
            _check_expected(files, expected_sha256)
        except ValueError as exc:
            problems.append(str(exc))
    sidecar = _sidecar(model.path)
    if sidecar.exists():
        recorded = json.loads(sidecar.read_text())["files"]
        for name in sorted(set(recorded) | set(files)):
            if name not in files:
                problems.append(f"{name}: missing since import")
            elif name not in recorded:
                problems.append(f"{name}: not part of the import")
            elif recorded[name] != files[name]:
                problems.append(f"{name}: size or sha256 changed since import")
    return problems


def download_weights(model: NeededModel) -> Path:
    """Fetch a hub model (``org/name``) into the hub cache, where its loader finds it."""
    from huggingface_hub import snapshot_download

    if model.path is not None:
        raise ValueError(
            f"{model.spec.family} expects local weights at {model.path}; "
            "use `talkforge models import`"
        )
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise RuntimeError(
            "HF_HUB_OFFLINE is set: no hub access; copy the weights to this machine and "
            "point the config's source at them (or `talkforge models import`)"
        )
    return Path(snapshot_download(repo_id=model.spec.source, revision=model.spec.revision))
