"""Shared helpers for the download-stage tests.

The sample dataset takes ~15 s to build, so :func:`sample_root` builds it once into pytest's
cache folder (``.pytest_cache``, git-ignored), keyed by a hash of ``tasks/download/sample.py``
and the seed: later runs reuse it, any change to the generator rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np

import tasks.download.sample as sample_module
from storage.store import ArtifactStore
from tasks.base import ItemContext, ItemInputs, StageEnv
from tasks.download.sample import build_sample_dataset
from tasks.download.stage import DownloadConfig, DownloadStage, SampleConfig
from tasks.records import NormalizedClip, SourceClip

SHARED = Path(__file__).resolve().parents[2] / "shared"
HDTF_METADATA = SHARED / "fixtures" / "metadata" / "hdtf"

_lock = threading.Lock()
_built: dict[int, Path] = {}


def sample_root(request: Any, seed: int = 0) -> Path:
    """The sample dataset for ``seed`` (``request`` is a pytest fixture request)."""
    with _lock:
        if seed not in _built:
            code = hashlib.sha256(_source_bytes()).hexdigest()
            base = request.config.cache.mkdir(f"download-sample-{code[:12]}-{seed}")
            _built[seed] = build_sample_dataset(base / "sample", seed=seed)
        return _built[seed]


def _source_bytes() -> bytes:
    return Path(sample_module.__file__).read_bytes()


def ffprobe_json(path: Path) -> dict[str, Any]:
    """Raw ffprobe streams + format, independent of tasks.media.probe."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)],
        capture_output=True,
        check=True,
    )
    return json.loads(out.stdout)


def stream(meta: dict[str, Any], codec_type: str) -> dict[str, Any] | None:
    return next((s for s in meta["streams"] if s["codec_type"] == codec_type), None)


def decode_audio(path: Path, rate_hz: int = 16000) -> np.ndarray:
    """Decode the first audio stream to float mono at ``rate_hz``."""
    out = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-vn", "-f", "s16le", "-ac", "1", "-ar",
         str(rate_hz), "-"],
        capture_output=True,
        check=True,
    )  # fmt: skip
    return np.frombuffer(out.stdout, "<i2").astype(np.float32) / 32768.0


def make_stage(data_root: Path, **config: Any) -> tuple[DownloadStage, ArtifactStore]:
    """A download stage on ``data_root`` with the store at ``data_root/store``."""
    config.setdefault("sample", SampleConfig(enabled=False))
    stage = DownloadStage(
        DownloadConfig(**config),
        StageEnv(data_root=str(data_root), store_uri=str(data_root / "store"), run_id="t"),
    )
    stage.setup()
    return stage, ArtifactStore(str(data_root / "store"))


def run_clip(
    stage: DownloadStage, store: ArtifactStore, clip: SourceClip
) -> tuple[NormalizedClip, ItemContext]:
    """Process one clip in-process; the caller closes the returned context."""
    ctx = ItemContext(store, stage.name, clip.clip_id, "k" * 40)
    rec = stage.process(ItemInputs(item_id=clip.clip_id, source=clip), ctx)
    return rec, ctx


def link_sample_into(data_root: Path, sample: Path, name: str = "sample") -> None:
    """Expose a prebuilt sample under ``data_root/<name>`` without copying its videos."""
    data_root.mkdir(parents=True, exist_ok=True)
    target = data_root / name
    if not target.exists():
        target.symlink_to(sample, target_is_directory=True)
