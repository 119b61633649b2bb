"""Fetch source videos with the yt-dlp Python API into a shared, locked raw cache.

One download per source video however many clips it holds: the raw file lives at
``<data_root>/raw/<dataset>/<source_id>.mp4`` and is fetched under an ``fcntl`` lock on
``.<source_id>.lock`` beside it, so two workers cutting clips of the same video never fetch
it twice at once; the second finds the finished file. yt-dlp writes to a ``.tmp-<uuid>-``
name in the same folder and the file is renamed only once complete, followed by a JSON
sidecar (url, size, sha256, format) that marks the cache entry valid. An interrupted
download therefore never leaves a file that looks complete, and leftovers of a killed
download are swept the next time the source's lock is taken.

Across sources, at most ``max_concurrent_downloads`` downloads run at once on a machine
(slot locks under ``raw/.slots``), whatever the number of workers: the polite limit for
YouTube is lower than the useful number of ffmpeg workers.

yt-dlp and HTTP errors are mapped to :class:`FailureKind` by
:func:`tasks.download.errors.classify_download_error`, so dead, private, geo-blocked and
bot-checked videos are typed failures. Rate limits and network errors are retried here with
exponential backoff and jitter, or after the server's ``Retry-After``
(:class:`~tasks.download.errors.RetryPolicy`); yt-dlp's own retries are turned off so that
one policy, with its waits, governs. The download slot is released while waiting. A
finished download is probed before it enters the cache: bytes that are not a video are a
``format`` failure and are deleted.

YouTube needs a JavaScript runtime for yt-dlp's signature and n-challenge solving (yt-dlp
since late 2025). Both parts come from PyPI and are pinned in the lock: the ``deno``
package's binary, passed by path as ``js_runtimes`` (so ``PATH`` does not matter), and the
``yt-dlp-ejs`` challenge-solver scripts, which yt-dlp finds as an installed package.
``yt-dlp -v`` style self-reports list both (``JS runtimes: deno-…``, ``yt_dlp_ejs-…``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import deno
import yt_dlp

from storage.store import ArtifactRef, UnsafeIdError, safe_id, sha256_file
from tasks.base import FailureKind, ItemContext, ItemFailure
from tasks.download.errors import RetryPolicy, classify_download_error
from tasks.media import probe

RAW_ARTIFACT_NAME = "source.mp4"
RAW_ARTIFACT_KIND = "raw_video"
# yt-dlp params the fetcher owns: overriding them would break the temp-name-then-rename
# protocol or the error mapping.
RESERVED_YTDLP_OPTIONS = frozenset(
    {"outtmpl", "paths", "logger", "progress_hooks", "postprocessor_hooks", "ignoreerrors"}
)
_SOURCE_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class FetchOptions:
    """How to download; built from the stage config."""

    target_height: int = 720
    cookies_file: str | None = None
    ytdlp_options: Mapping[str, str | int | bool] = field(default_factory=dict)
    max_concurrent_downloads: int = 2
    socket_timeout_s: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True)
class RawSource:
    """A complete raw download in the cache."""

    path: Path
    url: str
    size_bytes: int
    sha256: str
    downloaded: bool  # False when it was already cached


def format_selector(target_height: int) -> str:
    """Best video up to the target height merged with the best audio, else best muxed."""
    h = int(target_height)
    return f"bestvideo[height<={h}]+bestaudio/best[height<={h}]/best"


def check_source_id(source_id: str) -> str:
    """A source id usable as a cache file name (YouTube ids may start with ``-``/``_``)."""
    if not _SOURCE_ID.match(source_id or "") or ".." in source_id:
        raise ItemFailure(FailureKind.BAD_METADATA, f"unsafe source id {source_id!r}")
    return source_id


def raw_cache_path(data_root: Path, dataset: str, source_id: str) -> Path:
    try:
        safe_id(dataset)
    except UnsafeIdError as exc:
        raise ItemFailure(FailureKind.BAD_METADATA, str(exc)) from exc
    return Path(data_root) / "raw" / dataset / f"{check_source_id(source_id)}.mp4"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.stem}.lock"


@contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive ``fcntl`` lock, held across processes on this machine until exit."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextmanager
def download_slot(slot_dir: Path, slots: int, poll_s: float = 0.5) -> Iterator[int]:
    """Take one of ``slots`` machine-wide download slots (non-blocking tries, then poll)."""
    slot_dir.mkdir(parents=True, exist_ok=True)
    handles = []
    try:
        while True:
            for i in range(max(1, slots)):
                fh = open(slot_dir / f"slot-{i}.lock", "a+")  # noqa: SIM115 - held below
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    fh.close()
                    continue
                handles.append(fh)
                yield i
                return
            time.sleep(poll_s)
    finally:
        for fh in handles:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()


def cached_raw(path: Path, url: str) -> RawSource | None:
    """The cache entry for ``path`` if complete and fetched from ``url``, else None."""
    try:
        meta = json.loads(_sidecar(path).read_text())
        size = path.stat().st_size
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("url") != url or meta.get("size_bytes") != size or not meta.get("sha256"):
        return None
    return RawSource(path=path, url=url, size_bytes=size, sha256=meta["sha256"], downloaded=False)


def ensure_raw(
    data_root: Path, dataset: str, source_id: str, url: str, options: FetchOptions
) -> RawSource:
    """The raw download of ``source_id``: from the cache, or fetched now (once, locked)."""
    path = raw_cache_path(data_root, dataset, source_id)
    with file_lock(_lock_path(path)):
        hit = cached_raw(path, url)
        if hit is not None:
            return hit
        leftover = re.compile(rf"\.tmp-[0-9a-f]{{32}}-{re.escape(source_id)}\..+")
        for stale in path.parent.iterdir():
            if leftover.fullmatch(stale.name):
                stale.unlink(missing_ok=True)  # from a killed download; we hold the lock
        _sidecar(path).unlink(missing_ok=True)  # the entry is invalid until re-marked below
        info = _download_with_retries(Path(data_root), url, path, options)
        digest = sha256_file(path)
        meta = {"url": url, "size_bytes": path.stat().st_size, "sha256": digest, **info}
        tmp_meta = path.parent / f".tmp-{uuid.uuid4().hex}-{source_id}.json"
        tmp_meta.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp_meta, _sidecar(path))
        return RawSource(path, url, meta["size_bytes"], digest, downloaded=True)


def _download_with_retries(
    data_root: Path, url: str, dest: Path, options: FetchOptions
) -> dict[str, Any]:
    """:func:`download` under a slot, retried per ``options.retry``; then probed."""
    attempt = 1
    while True:
        try:
            with download_slot(data_root / "raw" / ".slots", options.max_concurrent_downloads):
                info = download(url, dest, options)
            break
        except ItemFailure as failure:
            if not options.retry.should_retry(failure, attempt):
                if attempt == 1:
                    raise
                message = f"{failure.message} (after {attempt} attempts)"
                raise ItemFailure(failure.kind, message) from failure
            time.sleep(options.retry.delay_s(attempt, getattr(failure, "retry_after_s", None)))
            attempt += 1
    try:
        media = probe(dest)
    except ItemFailure as failure:
        dest.unlink(missing_ok=True)
        raise ItemFailure(FailureKind.FORMAT, f"{url} is not a video: {failure.message}") from None
    info["attempts"] = attempt
    info["duration_s"] = media.duration_s
    return info


def raw_owner(dataset: str, source_id: str, raw: RawSource) -> tuple[str, str]:
    """Store owner of a raw download: one id per source, one key per (url, bytes).

    The id is ``<dataset>-<source_id>`` because YouTube ids may start with ``-`` or ``_``,
    which ``safe_id`` rejects as a leading character.
    """
    try:
        owner_id = safe_id(f"{dataset}-{source_id}")
    except UnsafeIdError as exc:
        raise ItemFailure(FailureKind.BAD_METADATA, str(exc)) from exc
    return owner_id, hashlib.sha256(f"{raw.url}\n{raw.sha256}".encode()).hexdigest()


def commit_raw(ctx: ItemContext, dataset: str, source_id: str, raw: RawSource) -> ArtifactRef:
    """Commit the raw download to the store once; later clips record the existing ref."""
    owner_id, owner_key = raw_owner(dataset, source_id, raw)
    with file_lock(_lock_path(raw.path)):
        existing = ctx.store.describe(
            ctx.stage, owner_id, owner_key, RAW_ARTIFACT_NAME, RAW_ARTIFACT_KIND
        )
        if existing is not None and existing.sha256 == raw.sha256:
            return ctx.record_existing(existing)
        return ctx.commit(
            raw.path, RAW_ARTIFACT_NAME, RAW_ARTIFACT_KIND, owner=(owner_id, owner_key)
        )


class _Logger:
    """Collects yt-dlp's messages instead of printing them."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def debug(self, msg: str) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        self.warnings.append(msg)

    def error(self, msg: str) -> None:
        self.errors.append(msg)


def js_runtimes() -> dict[str, dict[str, str]]:
    """yt-dlp's ``js_runtimes``: the Deno binary of the pinned ``deno`` package, by path."""
    return {"deno": {"path": deno.find_deno_bin()}}


def ydl_params(url: str, outtmpl: str, options: FetchOptions, logger: Any) -> dict[str, Any]:
    """yt-dlp parameters for one download; config extras cannot touch reserved keys."""
    reserved = RESERVED_YTDLP_OPTIONS & set(options.ytdlp_options)
    if reserved:
        raise ValueError(f"ytdlp_options may not set {sorted(reserved)}")
    params: dict[str, Any] = {
        "format": format_selector(options.target_height),
        "merge_output_format": "mp4",
        "postprocessors": [{"key": "FFmpegVideoRemuxer", "preferedformat": "mp4"}],
        "outtmpl": {"default": outtmpl},
        "enable_file_urls": url.startswith("file://"),
        "noplaylist": True,
        "quiet": True,
        "no_warnings": False,
        "noprogress": True,
        "cachedir": False,
        "overwrites": True,
        "continuedl": False,
        "retries": 0,  # retries are ours (RetryPolicy), with backoff and Retry-After
        "fragment_retries": 0,
        "extractor_retries": 0,
        "socket_timeout": options.socket_timeout_s,
        "logger": logger,
        "js_runtimes": js_runtimes(),
    }
    if options.cookies_file:
        params["cookiefile"] = str(Path(options.cookies_file).expanduser())
    params.update(options.ytdlp_options)
    return params


def download(url: str, dest: Path, options: FetchOptions) -> dict[str, Any]:
    """Download ``url`` to ``dest`` (temp name in the same folder, then rename).

    Returns format facts for the cache sidecar. Raises a typed :class:`ItemFailure`.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("file://"):
        _check_local_source(url)
    token = uuid.uuid4().hex
    outtmpl = str(dest.parent / f".tmp-{token}-{dest.stem}.%(ext)s")
    logger = _Logger()
    try:
        with yt_dlp.YoutubeDL(ydl_params(url, outtmpl, options, logger)) as ydl:
            info = ydl.extract_info(url, download=True)
            if not info:
                raise ItemFailure(FailureKind.UNAVAILABLE, f"yt-dlp returned nothing for {url}")
            if info.get("_type") in ("playlist", "multi_video"):
                raise ItemFailure(FailureKind.FORMAT, f"{url} is a playlist, not one video")
            downloads = info.get("requested_downloads") or [{}]
            produced = Path(downloads[0].get("filepath") or ydl.prepare_filename(info))
        if not produced.is_file() or produced.stat().st_size == 0:
            raise ItemFailure(FailureKind.FORMAT, f"yt-dlp produced no data for {url}")
        with open(produced, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(produced, dest)
    except ItemFailure:
        raise
    except (yt_dlp.utils.YoutubeDLError, OSError) as exc:
        raise classify_download_error(exc, logger.errors) from exc
    finally:
        for leftover in dest.parent.glob(f".tmp-{token}-*"):
            leftover.unlink(missing_ok=True)
    return {
        "extractor": info.get("extractor_key") or info.get("extractor"),
        "format_id": info.get("format_id"),
        "height": info.get("height"),
        "fps": info.get("fps"),
        "vcodec": info.get("vcodec"),
        "acodec": info.get("acodec"),
        "title": info.get("title"),
    }


def _check_local_source(url: str) -> None:
    """A ``file://`` source that is missing or empty fails clearly before yt-dlp runs
    (yt-dlp reports an empty file as "Did not get any data blocks", which over HTTP is a
    transient error)."""
    path = Path(url2pathname(urlparse(url).path))
    if not path.is_file():
        raise ItemFailure(FailureKind.UNAVAILABLE, f"{url}: no such file")
    if path.stat().st_size == 0:
        raise ItemFailure(FailureKind.FORMAT, f"{url}: empty (zero-byte) file")
