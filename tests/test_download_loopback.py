"""Downloads over HTTP from a loopback server that misbehaves on demand.

Every misbehaviour must become the right failure kind with the right retry behaviour, and
must leave nothing in the raw cache that looks complete. Served media: the real shared
clips when ``../shared`` is present, the generated sample videos otherwise.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import tasks.download.fetch as fetch
from tasks.base import FailureKind, ItemFailure
from tasks.download.errors import RetryPolicy, parse_retry_after
from tasks.download.fetch import FetchOptions, cached_raw, ensure_raw, raw_cache_path
from tests.download_helpers import SHARED
from tests.loopback_server import Route, serve

FAST = RetryPolicy(attempts=3, base_delay_s=0.2, max_delay_s=1.0, jitter=0.25)


@pytest.fixture(scope="module")
def video_bytes(sample_dir: Path) -> bytes:
    shared = SHARED / "fixtures" / "clips" / "face_3.mp4"
    path = shared if shared.is_file() else sample_dir / "videos" / "tfSmpl0001a.mp4"
    return path.read_bytes()


def _options(**kw) -> FetchOptions:
    return FetchOptions(socket_timeout_s=kw.pop("socket_timeout_s", 1.0), retry=FAST, **kw)


def _fetch(tmp_path: Path, url: str, source_id: str = "vid00000001", **kw):
    return ensure_raw(tmp_path, "loop", source_id, url, _options(**kw))


def _assert_nothing_cached(tmp_path: Path, source_id: str = "vid00000001") -> None:
    path = raw_cache_path(tmp_path, "loop", source_id)
    assert not path.exists()
    assert cached_raw(path, "any") is None
    assert not [p for p in path.parent.glob(".tmp-*")], "temp files left behind"


def _gaps(route: Route) -> list[float]:
    return [b - a for a, b in zip(route.hits, route.hits[1:], strict=False)]


def test_ok_download_is_cached_and_reused(tmp_path: Path, video_bytes: bytes):
    with serve() as server:
        route = Route(video_bytes)
        url = server.add("ok.mp4", route)
        raw = _fetch(tmp_path, url)
        hits = len(route.hits)
        again = _fetch(tmp_path, url)
    assert raw.downloaded and not again.downloaded
    assert raw.path.read_bytes() == video_bytes
    assert len(route.hits) == hits, "a cached source must not be fetched again"


@pytest.mark.parametrize(
    ("route", "kind", "retryable", "attempts"),
    [
        (Route(behaviour="status", status=404), FailureKind.UNAVAILABLE, False, 1),
        (Route(behaviour="status", status=403), FailureKind.NETWORK, True, 3),
        (Route(behaviour="status", status=500), FailureKind.NETWORK, True, 3),
        (
            Route(behaviour="status", status=429, retry_after="0"),
            FailureKind.RATE_LIMITED,
            True,
            3,
        ),
        (Route(behaviour="truncate"), FailureKind.NETWORK, True, 3),
        (Route(behaviour="html"), FailureKind.UNAVAILABLE, False, 1),
        (Route(behaviour="garbage"), FailureKind.FORMAT, False, 1),
    ],
    ids=["404", "403", "500", "429", "truncated", "web-page", "not-a-video"],
)
def test_misbehaving_server_gives_typed_failures(
    tmp_path: Path,
    video_bytes: bytes,
    route: Route,
    kind: FailureKind,
    retryable: bool,
    attempts: int,
):
    route.body = video_bytes
    with serve() as server:
        url = server.add("v.mp4", route)
        with pytest.raises(ItemFailure) as info:
            _fetch(tmp_path, url)
    failure = info.value
    assert failure.kind == kind, failure.message
    assert failure.retryable is retryable
    # permanent kinds are tried once; transient ones exhaust the policy's attempts
    assert (f"after {attempts} attempts" in failure.message) is (attempts > 1)
    _assert_nothing_cached(tmp_path)


def test_stalled_connection_times_out_and_leaves_no_file(tmp_path: Path, video_bytes: bytes):
    with serve() as server:
        route = Route(video_bytes, "stall", stall_s=20)
        url = server.add("stall.mp4", route)
        with pytest.raises(ItemFailure) as info:
            ensure_raw(
                tmp_path,
                "loop",
                "vid00000001",
                url,
                FetchOptions(socket_timeout_s=0.5, retry=RetryPolicy(attempts=2, base_delay_s=0)),
            )
    assert info.value.kind == FailureKind.NETWORK and info.value.retryable
    assert "stalled" in info.value.message or "timed out" in info.value.message
    _assert_nothing_cached(tmp_path)


def test_rate_limit_waits_for_retry_after_then_succeeds(tmp_path: Path, video_bytes: bytes):
    with serve() as server:
        route = Route(video_bytes, "status", 429, retry_after="1", times=1)
        url = server.add("busy.mp4", route)
        raw = _fetch(tmp_path, url)
    assert raw.downloaded and raw.path.read_bytes() == video_bytes
    assert _gaps(route)[0] >= 0.95, f"Retry-After: 1 not honoured: gaps {_gaps(route)}"


def test_server_errors_back_off_exponentially_then_succeed(
    tmp_path: Path, video_bytes: bytes, monkeypatch
):
    waits: list[float] = []
    monkeypatch.setattr(fetch.time, "sleep", waits.append)
    with serve() as server:
        route = Route(video_bytes, "status", 500, times=2)
        url = server.add("flaky.mp4", route)
        raw = _fetch(tmp_path, url)
    assert raw.downloaded and raw.path.read_bytes() == video_bytes
    # base 0.2 s doubling per attempt, scaled by a jitter factor in [0.75, 1]
    assert len(waits) == 2
    assert 0.15 <= waits[0] <= 0.2 and 0.3 <= waits[1] <= 0.4, waits


def test_retry_policy_delays():
    policy = RetryPolicy(attempts=5, base_delay_s=2.0, max_delay_s=10.0, jitter=0.5)
    rng = random.Random(0)
    for attempt, cap in [(1, 2.0), (2, 4.0), (3, 8.0), (4, 10.0), (9, 10.0)]:
        delays = [policy.delay_s(attempt, rng=rng) for _ in range(200)]
        assert cap * 0.5 <= min(delays) and max(delays) <= cap
        assert max(delays) - min(delays) > cap * 0.3, "no jitter"
    assert policy.delay_s(1, retry_after_s=7.0) == 7.0
    assert policy.delay_s(1, retry_after_s=10_000.0) == policy.max_retry_after_s
    assert policy.should_retry(ItemFailure(FailureKind.RATE_LIMITED, "x"), 4)
    assert not policy.should_retry(ItemFailure(FailureKind.RATE_LIMITED, "x"), 5)
    assert not policy.should_retry(ItemFailure(FailureKind.UNAVAILABLE, "x"), 1)
    assert not policy.should_retry(ItemFailure(FailureKind.BOT_CHECK, "x"), 1)


def test_parse_retry_after():
    now = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
    later = (now + timedelta(seconds=90)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(later, now=now) == pytest.approx(90.0)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
