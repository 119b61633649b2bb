"""Download failures: typing yt-dlp / HTTP errors, and the retry policy for transient ones.

:func:`classify_download_error` maps an exception (and what yt-dlp logged) to a
:class:`DownloadFailure`, an :class:`ItemFailure` that also carries the server's
``Retry-After`` when it sent one. Exception types decide first (HTTP status, geo
restriction, unsupported URL, transport errors), then the messages YouTube is known to
send. Anything unrecognised is a transient ``network`` error, so a resume retries it rather
than losing the video.

HTTP statuses: 404/410 → ``unavailable``; 429 → ``rate_limited``; 5xx → ``network``;
403 without a sign-in message → ``network`` (YouTube answers 403 to expired or throttled
media URLs, which a fresh extraction fixes). A URL that serves a web page instead of a
video is ``unavailable`` (yt-dlp: "Unsupported URL"); bytes served as a video that do not
decode are ``format`` (checked by the fetcher with ffprobe).

:class:`RetryPolicy` decides how often and how long to wait: exponential backoff with
jitter, or the server's ``Retry-After`` when given (capped). Only ``rate_limited`` and
``network`` are retried inside one attempt of an item; a bot check needs new cookies, so it
is left to a later resume (its kind stays retryable in the catalog).
"""

from __future__ import annotations

import email.utils
import random
from dataclasses import dataclass
from datetime import UTC, datetime

from yt_dlp.networking.exceptions import HTTPError, TransportError
from yt_dlp.utils import GeoRestrictedError, UnsupportedError

from tasks.base import FailureKind, ItemFailure

RETRIED_IN_PLACE = frozenset({FailureKind.RATE_LIMITED, FailureKind.NETWORK})


class DownloadFailure(ItemFailure):
    """An :class:`ItemFailure` of a download, with the server's wait hint if any."""

    def __init__(self, kind: FailureKind, message: str, *, retry_after_s: float | None = None):
        super().__init__(kind, message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RetryPolicy:
    """How transient download failures are retried within one item.

    Attempt ``n`` (1-based) that fails waits ``min(max_delay_s, base_delay_s * 2**(n-1))``
    scaled by a uniform factor in ``[1 - jitter, 1]`` (so workers that failed together do
    not retry together), or the server's ``Retry-After`` capped at ``max_retry_after_s``.
    """

    attempts: int = 4
    base_delay_s: float = 2.0
    max_delay_s: float = 60.0
    jitter: float = 0.5
    max_retry_after_s: float = 300.0

    def should_retry(self, failure: ItemFailure, attempt: int) -> bool:
        return failure.kind in RETRIED_IN_PLACE and attempt < self.attempts

    def delay_s(
        self, attempt: int, retry_after_s: float | None = None, rng: random.Random | None = None
    ) -> float:
        if retry_after_s is not None:
            return max(0.0, min(retry_after_s, self.max_retry_after_s))
        cap = min(self.max_delay_s, self.base_delay_s * 2 ** max(0, attempt - 1))
        return cap * (1.0 - self.jitter * (rng or random).random())


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """The exception and what caused it (yt-dlp wraps causes in ``exc_info``/``cause``)."""
    chain: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is seen for seen in chain) or len(chain) > 10:
            continue
        chain.append(e)
        exc_info = getattr(e, "exc_info", None)
        todo += [
            exc_info[1] if isinstance(exc_info, tuple) and len(exc_info) > 1 else None,
            getattr(e, "cause", None)
            if isinstance(getattr(e, "cause", None), BaseException)
            else None,
            e.__cause__,
            e.__context__,
        ]
    return chain


_PATTERNS: tuple[tuple[FailureKind, tuple[str, ...]], ...] = (
    (FailureKind.PRIVATE, ("private video", "sign in to confirm your age", "members-only")),
    (FailureKind.BOT_CHECK, ("sign in to confirm", "not a bot", "confirm you're not a bot")),
    (
        FailureKind.GEO_BLOCKED,
        ("not available in your country", "blocked it in your country", "geo restrict"),
    ),
    (FailureKind.RATE_LIMITED, ("http error 429", "too many requests", "rate-limit", "rate limit")),
    (
        FailureKind.UNAVAILABLE,
        (
            "video unavailable",
            "has been removed",
            "no longer available",
            "account associated with this video has been terminated",
            "does not exist",
            "http error 404",
            "http error 410",
            "no such file or directory",
            "unsupported url",
        ),
    ),
    (
        FailureKind.FORMAT,
        ("requested format is not available", "no video formats found", "postprocessing"),
    ),
)


def classify_download_error(exc: BaseException, logged: list[str] | None = None) -> DownloadFailure:
    """Map a yt-dlp / HTTP / OS error to a typed failure (retryable follows the kind)."""
    chain = _exception_chain(exc)
    text = " | ".join([*(logged or []), *(str(e) for e in chain)])
    message = _one_line(logged[-1] if logged else str(exc))
    lowered = text.lower()
    for e in chain:
        if isinstance(e, HTTPError):
            if e.status == 429:
                wait = parse_retry_after(e.response.headers.get("Retry-After"))
                return DownloadFailure(FailureKind.RATE_LIMITED, message, retry_after_s=wait)
            if e.status in (404, 410):
                return DownloadFailure(FailureKind.UNAVAILABLE, message)
            if e.status == 403 and "sign in" not in lowered:
                return DownloadFailure(FailureKind.NETWORK, f"HTTP 403 (throttled?): {message}")
            if e.status >= 500:
                wait = parse_retry_after(e.response.headers.get("Retry-After"))
                text = f"HTTP {e.status} server error: {message}"
                return DownloadFailure(FailureKind.NETWORK, text, retry_after_s=wait)
        if isinstance(e, GeoRestrictedError):
            return DownloadFailure(FailureKind.GEO_BLOCKED, message)
        if isinstance(e, UnsupportedError):
            return DownloadFailure(
                FailureKind.UNAVAILABLE, f"no video at this URL (a web page?): {message}"
            )
        if isinstance(e, FileNotFoundError):
            return DownloadFailure(FailureKind.UNAVAILABLE, message)
    for kind, needles in _PATTERNS:
        if any(n in lowered for n in needles):
            return DownloadFailure(kind, message)
    if any(isinstance(e, TransportError) for e in chain):
        return DownloadFailure(FailureKind.NETWORK, message)
    if "timed out" in lowered:
        return DownloadFailure(FailureKind.NETWORK, f"connection stalled: {message}")
    if "more expected" in lowered or "incomplete" in lowered:
        return DownloadFailure(FailureKind.NETWORK, f"truncated transfer: {message}")
    return DownloadFailure(FailureKind.NETWORK, f"unclassified download error: {message}")


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line.removeprefix("ERROR: ")[:limit]
