"""Reader for the published HDTF metadata (github MRzzm/HDTF ``HDTF_dataset/``).

Each subset (RD, WDA, WRA) has five space-separated files; their key spaces differ::

    <S>_video_url.txt       Radio11 https://www.youtube.com/watch?v=<id>[&t=6s]
    <S>_resolution.txt      Radio11.mp4 720
    <S>_annotion_time.txt   Radio11.mp4 00:30-01:00 01:30-02:30      (clip index = position)
    <S>_crop_wh.txt         Radio11_0.mp4 x w y h                       (pixels at the resolution)
    <S>_crop_ratio.txt      Radio11_0.mp4 1.2                           (not used here)

Every trap found in the real files is handled: a UTF-8 BOM (WDA url file), missing final
newlines, trailing spaces (split on whitespace, never on ``' '``), ``&t=Ns`` in URLs
(parsed with ``parse_qs``), ``MM:SS`` and ``H:MM:SS`` times, unsorted and overlapping
ranges (kept: they are real clips), a video with a URL but no annotation (``Radio24``:
reported), clips without a crop box (kept with ``crop=None``), two names sharing one
YouTube id (one download serves both) and non-standard heights (0, 360, 700, 714:
``declared_height=None``).

A line that is not valid UTF-8 is decoded alone: in a url or annotation file it becomes
a ``BAD_METADATA`` problem naming file, line and column (the video's other file is then
not reported again), in a resolution or crop file a warning; every other line goes on.

A row that cannot become a clip is returned as ``(raw_id, ItemFailure(BAD_METADATA))``;
oddities that do not stop a clip (a malformed crop line, a crop for a clip index that does
not exist) are returned as ``warnings``. Ids are validated with ``storage.store.safe_id``
and never rewritten, so a name like ``../x`` is a typed failure, not a path.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from storage.store import UnsafeIdError, safe_id
from tasks.base import FailureKind, ItemFailure
from tasks.records import CropBox, SourceClip

HDTF_SUBSETS: tuple[str, ...] = ("RD", "WDA", "WRA")
STANDARD_HEIGHTS = frozenset({720, 1080, 2160})
HDTF_LICENCE = "CC-BY-4.0 (HDTF README; videos remain their YouTube owners')"
WATCH_URL = "https://www.youtube.com/watch?v={id}"

_YOUTUBE_ID = re.compile(r"^[A-Za-z0-9_-]{11}$")
_TIME = re.compile(r"^(?:(\d+):)?(\d{1,3}):(\d{2}(?:\.\d+)?)$")
_YOUTUBE_HOSTS = {"youtube.com", "www.youtube.com", "m.youtube.com", "music.youtube.com"}

Problem = tuple[str, ItemFailure]


@dataclass(frozen=True)
class HdtfSummary:
    """Counts over the files read; pinned by tests against the published numbers."""

    url_entries: int  # lines in the url files (370 for the full release)
    unique_source_ids: int  # distinct YouTube ids among them (369)
    annotated_videos: int  # annotation lines (369)
    segments: int  # valid time ranges (436)
    segments_duration_s: float  # their total length (≈ 17.07 h)
    clips: int  # SourceClip records produced
    clips_with_crop: int  # of which carry a crop box (421)
    problems: int


@dataclass
class HdtfManifest:
    clips: list[SourceClip]
    problems: list[Problem]
    warnings: list[str] = field(default_factory=list)
    summary: HdtfSummary | None = None


@dataclass(frozen=True)
class _Row:
    file: str
    lineno: int
    tokens: tuple[str, ...]
    error: str | None = None  # why the line could not be decoded (tokens then hold U+FFFD)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.lineno}"


def parse_time_s(text: str) -> float:
    """``MM:SS`` or ``H:MM:SS`` (seconds may carry a fraction) to seconds; ValueError if bad."""
    m = _TIME.match(text.strip())
    if not m:
        raise ValueError(f"bad time {text!r}: expected MM:SS or H:MM:SS")
    hours, minutes, seconds = m.group(1), int(m.group(2)), float(m.group(3))
    if seconds >= 60 or (hours is not None and minutes >= 60):
        raise ValueError(f"bad time {text!r}: field out of range")
    return (int(hours) if hours else 0) * 3600 + minutes * 60 + seconds


def parse_range_s(text: str) -> tuple[float, float]:
    """``MM:SS-MM:SS`` to ``(start_s, end_s)`` with ``0 <= start < end``; ValueError if bad."""
    parts = text.split("-")
    if len(parts) != 2:
        raise ValueError(f"bad range {text!r}: expected START-END")
    start, end = parse_time_s(parts[0]), parse_time_s(parts[1])
    if end <= start:
        raise ValueError(f"bad range {text!r}: end is not after start")
    return start, end


def youtube_id_from_url(url: str) -> str:
    """The 11-character video id of a YouTube watch / youtu.be URL; ValueError otherwise."""
    parsed = urlparse(url.strip())
    host = (parsed.hostname or "").lower()
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url!r}")
    if host == "youtu.be":
        vid = parsed.path.lstrip("/").split("/")[0]
    elif host in _YOUTUBE_HOSTS and parsed.path == "/watch":
        values = parse_qs(parsed.query).get("v", [])
        vid = values[0] if len(values) == 1 else ""
    else:
        raise ValueError(f"not a YouTube watch URL: {url!r}")
    if not _YOUTUBE_ID.match(vid):
        raise ValueError(f"no valid 11-character video id in {url!r}")
    return vid


def speaker_of(subset: str, name: str) -> str:
    """Speaker label: WDA/WRA names are people with a video number (``AdamKinzinger2``);
    RD names (``Radio11``) say nothing about the speaker, so each video counts as its own."""
    return name if subset == "RD" else name.rstrip("0123456789") or name


def read_table(path: Path) -> list[_Row]:
    """Non-empty lines of a metadata file split on whitespace (BOM and CRLF tolerated).

    Lines are decoded one by one, so an invalid UTF-8 byte spoils only its own line: that
    row carries ``error`` (column and byte) and tokens decoded with replacement characters.
    """
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    rows = []
    for lineno, raw in enumerate(data.splitlines(), start=1):
        error = None
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.decode("utf-8", errors="replace")
            error = f"invalid UTF-8 at column {exc.start + 1} (byte 0x{raw[exc.start]:02x})"
        tokens = tuple(line.split())
        if tokens:
            rows.append(_Row(path.name, lineno, tokens, error))
    return rows


def _decodable(
    rows: list[_Row], out: _SubsetResult, prefix: str, unreadable: set[str]
) -> list[_Row]:
    """Rows that decoded; each other one is a problem (its name added to ``unreadable``)."""
    good = []
    for row in rows:
        if row.error is None:
            good.append(row)
            continue
        name = _strip_mp4(row.tokens[0])
        clean = "\ufffd" not in name
        if clean:
            unreadable.add(name)
        raw_id = f"{prefix}-{name}" if clean else f"{prefix}-{row.where}"
        out.problems.append(_bad(raw_id, f"{row.where}: {row.error}; line skipped"))
    return good


def _strip_mp4(name: str) -> str:
    return name[:-4] if name.endswith(".mp4") else name


def read_hdtf(
    metadata_dir: Path,
    subsets: Sequence[str] = HDTF_SUBSETS,
    url_template: str | None = None,
    *,
    dataset: str = "hdtf",
    licence: str = HDTF_LICENCE,
) -> HdtfManifest:
    """Read HDTF metadata into clip records, per-row problems and summary counts.

    ``url_template`` (e.g. ``"file:///mirror/{id}.mp4"``) replaces the published watch URL,
    formatted with the YouTube id; without it the URL is the normalised watch URL (query
    extras such as ``&t=6s`` dropped). ``dataset`` prefixes clip ids
    (``<dataset>-<subset>-<name>_<idx>``). A subset whose url or annotation file is missing
    is a configuration error (``FileNotFoundError``); missing resolution or crop files only
    produce warnings.
    """
    metadata_dir = Path(metadata_dir)
    clips: list[SourceClip] = []
    problems: list[Problem] = []
    warnings: list[str] = []
    counts = {"url_entries": 0, "annotated_videos": 0, "segments": 0}
    duration_s = 0.0
    source_ids: set[str] = set()
    for subset in subsets:
        part = _read_subset(metadata_dir, subset, url_template, dataset, licence)
        clips += part.clips
        problems += part.problems
        warnings += part.warnings
        source_ids |= part.source_ids
        counts["url_entries"] += part.url_entries
        counts["annotated_videos"] += part.annotated_videos
        counts["segments"] += part.segments
        duration_s += part.duration_s
    summary = HdtfSummary(
        url_entries=counts["url_entries"],
        unique_source_ids=len(source_ids),
        annotated_videos=counts["annotated_videos"],
        segments=counts["segments"],
        segments_duration_s=duration_s,
        clips=len(clips),
        clips_with_crop=sum(c.crop is not None for c in clips),
        problems=len(problems),
    )
    return HdtfManifest(clips=clips, problems=problems, warnings=warnings, summary=summary)


@dataclass
class _SubsetResult:
    clips: list[SourceClip] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source_ids: set[str] = field(default_factory=set)
    url_entries: int = 0
    annotated_videos: int = 0
    segments: int = 0
    duration_s: float = 0.0


def _bad(raw_id: str, message: str) -> Problem:
    return raw_id, ItemFailure(FailureKind.BAD_METADATA, message)


def _keyed(
    rows: Iterable[_Row], key_of: Callable[[str], str], out: _SubsetResult, prefix: str
) -> dict[str, _Row]:
    """Index rows by key; a repeated key is a problem and the first row wins."""
    table: dict[str, _Row] = {}
    for row in rows:
        key = key_of(row.tokens[0])
        if key in table:
            out.problems.append(
                _bad(f"{prefix}-{key}", f"{row.where}: duplicate entry for {key!r}")
            )
            continue
        table[key] = row
    return table


def _read_subset(
    metadata_dir: Path, subset: str, url_template: str | None, dataset: str, licence: str
) -> _SubsetResult:
    out = _SubsetResult()
    prefix = f"{dataset}-{subset}"
    url_rows = read_table(metadata_dir / f"{subset}_video_url.txt")
    ann_rows = read_table(metadata_dir / f"{subset}_annotion_time.txt")
    out.url_entries = len(url_rows)
    out.annotated_videos = len(ann_rows)
    unreadable: set[str] = set()
    url_rows = _decodable(url_rows, out, prefix, unreadable)
    ann_rows = _decodable(ann_rows, out, prefix, unreadable)
    urls = _keyed(url_rows, _strip_mp4, out, prefix)
    annotations = _keyed(ann_rows, _strip_mp4, out, prefix)
    heights = _read_heights(metadata_dir / f"{subset}_resolution.txt", out)
    crops = _read_crops(metadata_dir / f"{subset}_crop_wh.txt", out)

    for name, row in urls.items():
        if len(row.tokens) != 2:
            out.problems.append(_bad(f"{prefix}-{name}", f"{row.where}: expected 'name url'"))
            continue
        with contextlib.suppress(ValueError):  # a bad URL is reported with its annotation
            out.source_ids.add(youtube_id_from_url(row.tokens[1]))
        if name not in annotations and name not in unreadable:
            out.problems.append(
                _bad(f"{prefix}-{name}", f"{row.where}: video has a URL but no annotation line")
            )
    for name, row in annotations.items():
        if name not in urls:
            if name not in unreadable:
                out.problems.append(
                    _bad(f"{prefix}-{name}", f"{row.where}: annotated video has no URL entry")
                )
            continue
        url_row = urls[name]
        if len(url_row.tokens) != 2:
            continue  # already reported
        try:
            source_id = youtube_id_from_url(url_row.tokens[1])
        except ValueError as exc:
            out.problems.append(_bad(f"{prefix}-{name}", f"{url_row.where}: {exc}"))
            continue
        url = url_template.format(id=source_id) if url_template else WATCH_URL.format(id=source_id)
        ranges = row.tokens[1:]
        if not ranges:
            out.problems.append(_bad(f"{prefix}-{name}", f"{row.where}: no time ranges"))
        declared = heights.get(name)
        for idx, text in enumerate(ranges):
            raw_id = f"{prefix}-{name}_{idx}"
            try:
                clip_id = safe_id(raw_id)
            except UnsafeIdError as exc:
                out.problems.append(_bad(raw_id, f"{row.where}: {exc}"))
                continue
            try:
                start_s, end_s = parse_range_s(text)
            except ValueError as exc:
                out.problems.append(_bad(raw_id, f"{row.where}: {exc}"))
                continue
            out.segments += 1
            out.duration_s += end_s - start_s
            box = crops.pop(f"{name}_{idx}", None)
            crop = None
            if box is not None:
                x, w, y, h = box
                crop = CropBox(x=x, y=y, w=w, h=h, reference_height=declared)
            out.clips.append(
                SourceClip(
                    dataset=dataset,
                    subset=subset,
                    source_id=source_id,
                    clip_id=clip_id,
                    url=url,
                    start_s=start_s,
                    end_s=end_s,
                    declared_height=declared,
                    crop=crop,
                    licence=licence,
                    speaker=speaker_of(subset, name),
                    language="en",
                )
            )
    out.warnings += [f"{subset}: crop box for unknown clip {key!r}" for key in sorted(crops)]
    return out


def _read_heights(path: Path, out: _SubsetResult) -> dict[str, int | None]:
    """Declared frame heights by video name; non-standard values (0, 360, 714...) are None."""
    if not path.exists():
        out.warnings.append(f"{path.name} missing: declared heights unknown")
        return {}
    heights: dict[str, int | None] = {}
    for row in read_table(path):
        if row.error is not None:
            out.warnings.append(f"{row.where}: {row.error}; resolution line ignored")
            continue
        name = _strip_mp4(row.tokens[0])
        value = row.tokens[1] if len(row.tokens) == 2 else ""
        height = int(value) if value.isdigit() else None
        if height is None:
            out.warnings.append(f"{row.where}: unreadable resolution {row.tokens[1:]!r}")
        heights[name] = height if height in STANDARD_HEIGHTS else None
    return heights


def _read_crops(path: Path, out: _SubsetResult) -> dict[str, tuple[int, int, int, int]]:
    """Crop boxes ``(x, w, y, h)`` by ``name_idx``; malformed lines become warnings."""
    if not path.exists():
        out.warnings.append(f"{path.name} missing: no crop boxes")
        return {}
    crops: dict[str, tuple[int, int, int, int]] = {}
    for row in read_table(path):
        if row.error is not None:
            out.warnings.append(f"{row.where}: {row.error}; crop line ignored")
            continue
        key = _strip_mp4(row.tokens[0])
        values = row.tokens[1:]
        if len(values) != 4 or not all(v.isdigit() for v in values):
            out.warnings.append(f"{row.where}: malformed crop box {values!r}, ignored")
            continue
        x, w, y, h = (int(v) for v in values)
        if w == 0 or h == 0:
            out.warnings.append(f"{row.where}: empty crop box, ignored")
            continue
        if key in crops:
            out.warnings.append(f"{row.where}: duplicate crop box for {key!r}, first kept")
            continue
        crops[key] = (x, w, y, h)
    return crops


def scale_crop(
    crop: CropBox, frame_width: int, frame_height: int, *, max_overshoot: float = 0.1
) -> CropBox:
    """The crop box in the pixels of a real frame, validated; ``ItemFailure`` if unusable.

    The box is scaled by ``frame_height / reference_height`` (HDTF boxes are measured at the
    declared resolution; an unknown reference means the box is taken as measured on this
    frame). A box sticking out of the frame by at most ``max_overshoot`` of its side is
    shifted inside (and shrunk to the frame if larger than it); a box further out means the
    reference resolution is wrong, and is rejected with ``BAD_METADATA`` rather than
    silently cropping the wrong region. Sides are rounded down to even numbers for yuv420p.
    """
    scale = frame_height / crop.reference_height if crop.reference_height else 1.0
    x, y = crop.x * scale, crop.y * scale
    w, h = crop.w * scale, crop.h * scale
    overshoot = max(-x, -y, x + w - frame_width, y + h - frame_height, 0.0)
    if overshoot > max_overshoot * max(w, h):
        raise ItemFailure(
            FailureKind.BAD_METADATA,
            f"crop box x={crop.x} y={crop.y} w={crop.w} h={crop.h} "
            f"(reference height {crop.reference_height}) lies {overshoot:.0f}px outside "
            f"the {frame_width}x{frame_height} frame",
        )
    w_px = min(round(w), frame_width) // 2 * 2
    h_px = min(round(h), frame_height) // 2 * 2
    if w_px < 16 or h_px < 16:
        raise ItemFailure(FailureKind.BAD_METADATA, f"crop box {w_px}x{h_px}px is too small")
    x_px = min(max(round(x), 0), frame_width - w_px)
    y_px = min(max(round(y), 0), frame_height - h_px)
    return CropBox(x=x_px, y=y_px, w=w_px, h=h_px, reference_height=frame_height)
