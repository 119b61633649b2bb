"""Fetching: yt-dlp API downloads of file:// sources, the locked raw cache, error typing."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import pytest
from yt_dlp.networking import Response
from yt_dlp.networking.exceptions import HTTPError, TransportError
from yt_dlp.utils import DownloadError, ExtractorError, GeoRestrictedError

import tasks.download.fetch as fetch
from tasks.base import FailureKind, ItemFailure
from tasks.download.errors import classify_download_error
from tasks.download.fetch import (
    FetchOptions,
    download_slot,
    ensure_raw,
    format_selector,
    raw_cache_path,
    ydl_params,
)
from tasks.download.sample import SOURCES, sample_videos_dir
from tests.download_helpers import sample_root


@pytest.fixture(scope="module")
def sample(request) -> Path:
    return sample_root(request)


def _wrapped(exc: Exception) -> DownloadError:
    """How YoutubeDL.report_error surfaces an extractor/network error to API callers."""
    return DownloadError(f"ERROR: {exc}", (type(exc), exc, None))


def _http(status: int) -> HTTPError:
    return HTTPError(Response(io.BytesIO(b""), "https://x.test/v", {}, status=status))


@pytest.mark.parametrize(
    ("exc", "kind", "retryable"),
    [
        (
            _wrapped(ExtractorError("[youtube] abc: Video unavailable", expected=True)),
            FailureKind.UNAVAILABLE,
            False,
        ),
        (
            _wrapped(ExtractorError("[youtube] abc: This video has been removed by the uploader")),
            FailureKind.UNAVAILABLE,
            False,
        ),
        (
            _wrapped(
                ExtractorError(
                    "[youtube] abc: Private video. "
                    "Sign in if you've been granted access to this video"
                )
            ),
            FailureKind.PRIVATE,
            False,
        ),
        (
            _wrapped(
                ExtractorError(
                    "[youtube] abc: Sign in to confirm you’re not a bot. "
                    "Use --cookies-from-browser or --cookies for the authentication."
                )
            ),
            FailureKind.BOT_CHECK,
            True,
        ),
        (
            _wrapped(
                GeoRestrictedError("The uploader has not made this video available in your country")
            ),
            FailureKind.GEO_BLOCKED,
            False,
        ),
        (_wrapped(_http(429)), FailureKind.RATE_LIMITED, True),
        (_wrapped(_http(404)), FailureKind.UNAVAILABLE, False),
        (_wrapped(_http(503)), FailureKind.NETWORK, True),
        (_wrapped(TransportError("timed out")), FailureKind.NETWORK, True),
        (
            DownloadError(
                "ERROR: [youtube] abc: Requested format is not available. Use --list-formats"
            ),
            FailureKind.FORMAT,
            False,
        ),
    ],
)
def test_classify_download_error(exc: Exception, kind: FailureKind, retryable: bool):
    failure = classify_download_error(exc)
    assert isinstance(failure, ItemFailure)
    assert failure.kind == kind and failure.retryable is retryable
    assert "\n" not in failure.message and failure.message


def test_format_selector_and_params(tmp_path: Path):
    assert format_selector(720) == "bestvideo[height<=720]+bestaudio/best[height<=720]/best"
    cookies = tmp_path / "cookies.txt"
    opts = FetchOptions(target_height=1080, cookies_file=str(cookies), ytdlp_options={"retries": 9})
    params = ydl_params("https://www.youtube.com/watch?v=x", "/o/%(ext)s", opts, None)
    assert params["format"].startswith("bestvideo[height<=1080]")
    assert params["merge_output_format"] == "mp4"
    assert params["cookiefile"] == str(cookies) and params["retries"] == 9
    assert params["enable_file_urls"] is False
    assert ydl_params("file:///v/a.mp4", "/o/%(ext)s", FetchOptions(), None)["enable_file_urls"]
    with pytest.raises(ValueError, match="outtmpl"):
        ydl_params("file:///a", "/o", FetchOptions(ytdlp_options={"outtmpl": "/etc/x"}), None)


def test_cache_path_rejects_escaping_ids(tmp_path: Path):
    assert raw_cache_path(tmp_path, "hdtf", "-93rQjLe3Sw").name == "-93rQjLe3Sw.mp4"
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ItemFailure) as err:
            raw_cache_path(tmp_path, "hdtf", bad)
        assert err.value.kind == FailureKind.BAD_METADATA
    with pytest.raises(ItemFailure):
        raw_cache_path(tmp_path, "../hdtf", "abc")


def test_download_file_url_into_cache(tmp_path: Path, sample: Path):
    src = SOURCES[2]
    url = (sample_videos_dir(sample) / f"{src.youtube_id}.mp4").as_uri()
    raw = ensure_raw(tmp_path, "sample", src.youtube_id, url, FetchOptions())
    assert raw.downloaded and raw.path == tmp_path / "raw" / "sample" / f"{src.youtube_id}.mp4"
    assert (
        raw.path.read_bytes() == (sample_videos_dir(sample) / f"{src.youtube_id}.mp4").read_bytes()
    )
    assert not list(raw.path.parent.glob(".tmp-*"))  # nothing half-written left behind
    sidecar = json.loads(raw.path.with_suffix(".json").read_text())
    assert sidecar["extractor"] == "Generic" and sidecar["url"] == url  # yt-dlp did the work
    again = ensure_raw(tmp_path, "sample", src.youtube_id, url, FetchOptions())
    assert not again.downloaded and again.sha256 == raw.sha256
    # a different URL for the same source id is not served from the stale cache
    other = sample_videos_dir(sample) / f"{SOURCES[0].youtube_id}.mp4"
    moved = ensure_raw(tmp_path, "sample", src.youtube_id, other.as_uri(), FetchOptions())
    assert moved.downloaded and moved.sha256 != raw.sha256


def test_interrupted_download_never_looks_complete(tmp_path: Path, sample: Path):
    src = SOURCES[0]
    url = (sample_videos_dir(sample) / f"{src.youtube_id}.mp4").as_uri()
    cache = raw_cache_path(tmp_path, "sample", src.youtube_id)
    cache.parent.mkdir(parents=True)
    # leftovers of a killed download: a temp file, and a renamed file without its sidecar
    stale = cache.parent / f".tmp-{'ab' * 16}-{src.youtube_id}.mp4.part"
    other = cache.parent / f".tmp-{'cd' * 16}-x-{src.youtube_id}.mp4.part"  # another source
    other.write_bytes(b"in flight")
    stale.write_bytes(b"partial")
    cache.write_bytes(b"not the real video")
    raw = ensure_raw(tmp_path, "sample", src.youtube_id, url, FetchOptions())
    assert raw.downloaded and raw.size_bytes > 1000
    assert not stale.exists() and other.exists()


def test_missing_source_is_unavailable_and_leaves_no_file(tmp_path: Path):
    url = (tmp_path / "nowhere" / "gone.mp4").as_uri()
    with pytest.raises(ItemFailure) as err:
        ensure_raw(tmp_path, "sample", "gone0000000", url, FetchOptions())
    assert err.value.kind == FailureKind.UNAVAILABLE and not err.value.retryable
    folder = tmp_path / "raw" / "sample"
    assert not [p for p in folder.iterdir() if not p.name.endswith(".lock")]


def test_one_download_per_source_under_concurrency(tmp_path: Path, sample: Path, monkeypatch):
    src = SOURCES[1]
    url = (sample_videos_dir(sample) / f"{src.youtube_id}.mp4").as_uri()
    calls: list[str] = []
    real_download = fetch.download

    def counting_download(u, dest, options):
        calls.append(u)
        time.sleep(0.3)  # widen the race window
        return real_download(u, dest, options)

    monkeypatch.setattr(fetch, "download", counting_download)
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                ensure_raw(tmp_path, "sample", src.youtube_id, url, FetchOptions())
            )
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(r.downloaded for r in results) == [False, False, True]
    assert len({r.sha256 for r in results}) == 1


def test_download_slots_bound_concurrency(tmp_path: Path):
    inside = []
    peak = []
    guard = threading.Lock()

    def worker():
        with download_slot(tmp_path, 2, poll_s=0.02):
            with guard:
                inside.append(1)
                peak.append(len(inside))
            time.sleep(0.15)
            with guard:
                inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(peak) == 2 and len(peak) == 5


def test_download_failing_midway_leaves_no_file(tmp_path: Path, sample: Path, monkeypatch):
    src = SOURCES[0]
    url = (sample_videos_dir(sample) / f"{src.youtube_id}.mp4").as_uri()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fetch.os, "replace", disk_full)  # yt-dlp's and ours
    with pytest.raises(ItemFailure) as err:
        ensure_raw(tmp_path, "sample", src.youtube_id, url, FetchOptions())
    assert err.value.retryable
    folder = tmp_path / "raw" / "sample"
    assert sorted(p.name for p in folder.iterdir()) == [f".{src.youtube_id}.lock"]


def test_ytdlp_reports_the_pinned_deno_runtime_and_ejs_offline(monkeypatch: pytest.MonkeyPatch):
    """yt-dlp's own verbose self-report sees Deno (by path, not PATH) and yt-dlp-ejs."""
    from importlib.metadata import version

    import deno
    import yt_dlp

    class Debug:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def debug(self, msg: str) -> None:
            self.lines.append(msg)

        info = warning = error = debug

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the venv's bin (with deno) is not on PATH
    log = Debug()
    params = ydl_params("https://www.youtube.com/watch?v=x", "/o/%(ext)s", FetchOptions(), log)
    with yt_dlp.YoutubeDL({**params, "verbose": True}) as ydl:
        ydl.print_debug_header()  # what `yt-dlp -v` prints; no network
    report = "\n".join(log.lines)
    assert f"JS runtimes: deno-{version('deno')}" in report
    assert params["js_runtimes"] == {"deno": {"path": deno.find_deno_bin()}}
    assert f"yt_dlp_ejs-{version('yt-dlp-ejs')}" in report
