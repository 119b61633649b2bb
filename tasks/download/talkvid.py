"""Reader for the TalkVid release metadata (HF ``FreedomIntelligence/TalkVid``, ``data/``).

``filtered_video_clips.json`` (≈188k records) and ``..._with_captions.json`` are JSON
arrays of clip objects (official README "Data Format")::

    {"id": "videovideoTr6MMsoWAog-scene1-scene1", "height": 1080, "width": 1920, "fps": 24.0,
     "start-time": 0.1, "start-frame": 0, "end-time": 5.141666666666667, "end-frame": 121,
     "durations": "5.042s",
     "info": {"Person ID": "597", "Ethnicity": "White", "Age Group": "60+", "Gender": "Male",
              "Video Link": "https://www.youtube.com/watch?v=Tr6MMsoWAog",
              "Language": "English", "Video Category": "Personal Experience"},
     "description": "...", "dover_scores": 8.9, "cotracker_ratio": 0.927,
     "head_detail": {"scores": {"avg_movement": 97.9, "min_movement": 89.4, ...}}}

Traps handled: the source id comes from ``info["Video Link"]`` (or ``info["video_link"]``),
never from ``id``, whose prefixes vary and whose YouTube part may start with ``-``; a
``start-time`` of 0.0 is a real start (the official ``download_clips.py`` reads it with
``or`` and silently drops such clips); ``start-frame``/``end-frame`` are not used (they
were not shifted with the start time); ``durations`` is a string (``"5.042s"``, or
``"5.0s"`` from the segmentation code), only cross-checked against the times; a repeated
``id`` keeps the first record, each repeat a problem keyed ``<dataset>-<id>#dup<index>``
so it never shadows the kept clip; a record without a usable ``id`` is keyed
``<dataset>-#<index>`` (its position in the array).

A record that cannot become a clip is returned as ``(raw_id, ItemFailure(BAD_METADATA))``;
oddities that do not stop a clip (unreadable ``durations`` or scores, declared size or fps
missing) are ``warnings``. A file whose top level is not an array raises ``ValueError``.
``speaker`` is the ``Person ID`` (dataset-local), or the source id when it is missing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.store import UnsafeIdError, safe_id
from tasks.base import FailureKind, ItemFailure
from tasks.download.hdtf import WATCH_URL, youtube_id_from_url
from tasks.download.json_input import first_undecodable, load_json, printable
from tasks.records import SourceClip, TalkvidAnnotations

TALKVID_LICENCE = (
    "CC-BY-NC-4.0 (TalkVid HF card: research, non-commercial; videos remain their YouTube owners')"
)
RELEASE_GLOB = "filtered_video_clips*.json"
DURATION_TOLERANCE_S = 0.5  # ``durations`` vs end - start before a warning
LINK_KEYS: tuple[str, ...] = ("Video Link", "video_link")
PERSON_FIELDS: dict[str, str] = {
    "person_id": "Person ID",
    "gender": "Gender",
    "age_group": "Age Group",
    "ethnicity": "Ethnicity",
    "category": "Video Category",
}

Problem = tuple[str, ItemFailure]
_video_id = functools.lru_cache(maxsize=1 << 16)(youtube_id_from_url)  # many clips per video


@dataclass(frozen=True)
class TalkvidSummary:
    records: int  # entries in the array (≈188k for the full release)
    clips: int  # SourceClip records produced
    unique_source_ids: int
    speakers: int  # distinct speaker labels among the clips
    duration_s: float  # total length of the produced clips
    languages: int  # distinct non-empty languages among the clips
    problems: int


@dataclass
class TalkvidManifest:
    clips: list[SourceClip]
    problems: list[Problem]
    warnings: list[str]
    summary: TalkvidSummary


@dataclass
class _Context:
    file: str
    dataset: str
    url_template: str | None
    licence: str
    warnings: list[str] = field(default_factory=list)


def _bad(name: str, problem: str) -> ItemFailure:
    return ItemFailure(FailureKind.BAD_METADATA, f"{name} {problem}")


def read_talkvid(
    path: Path,
    url_template: str | None = None,
    *,
    dataset: str = "talkvid",
    licence: str = TALKVID_LICENCE,
) -> TalkvidManifest:
    """Read a TalkVid metadata file (or the folder holding it) into clips and problems.

    ``url_template`` (e.g. ``"file:///mirror/{id}.mp4"``) replaces the YouTube watch URL,
    formatted with the YouTube id. Clip ids are ``<dataset>-<record id>``.
    """
    reader = TalkvidReader(path, url_template, dataset=dataset, licence=licence)
    clips = list(reader)
    assert reader.summary is not None
    return TalkvidManifest(
        clips=clips, problems=reader.problems, warnings=reader.warnings, summary=reader.summary
    )


class TalkvidReader:
    """A TalkVid release read record by record, for an ingest that streams (≈188k clips).

    The file is parsed on construction (``ValueError`` if it is not a JSON array).
    Iterating yields its clips in file order, once; ``problems`` and ``warnings`` grow as it
    goes and ``summary`` is set when it ends. Each parsed record is dropped as soon as it is
    converted, so memory holds the shrinking parsed file plus what the consumer keeps (the
    ingest keeps one chunk of clips; a list of all clips is about 5 KB per clip).
    """

    def __init__(
        self,
        path: Path,
        url_template: str | None = None,
        *,
        dataset: str = "talkvid",
        licence: str = TALKVID_LICENCE,
    ) -> None:
        self.file = talkvid_metadata_file(Path(path))
        self._records, self._undecodable = _load(self.file)
        self._ctx = _Context(self.file.name, dataset, url_template, licence)
        self.problems: list[Problem] = []
        self.summary: TalkvidSummary | None = None
        self._started = False

    @property
    def warnings(self) -> list[str]:
        return self._ctx.warnings

    def __iter__(self) -> Iterator[SourceClip]:
        if self._started:
            raise RuntimeError(f"{self.file}: a TalkvidReader is iterated once")
        self._started = True
        records, ctx, name = self._records, self._ctx, self.file.name
        first_seen: dict[str, int] = {}
        sources: set[str] = set()
        speakers: set[str] = set()
        languages: set[str] = set()
        clips, duration_s = 0, 0.0
        for index, record in enumerate(records):
            records[index] = None  # the parsed record is not needed once converted
            raw_id, failure = _record_key(index, record, ctx.dataset, first_seen)
            bad_bytes = first_undecodable(record) if self._undecodable else None
            if bad_bytes:
                failure = _bad("record", f"holds invalid UTF-8 in {bad_bytes}")
            if failure is None:
                try:
                    clip = _clip(record, raw_id, ctx)
                except ItemFailure as exc:
                    failure = exc
                else:
                    clips += 1
                    duration_s += clip.duration_s
                    sources.add(clip.source_id)
                    speakers.add(clip.speaker)
                    if clip.language:
                        languages.add(clip.language)
                    yield clip
                    continue
            self.problems.append((raw_id, _bad(f"{name}[{index}]:", failure.message)))
        self.summary = TalkvidSummary(
            records=len(records),
            clips=clips,
            unique_source_ids=len(sources),
            speakers=len(speakers),
            duration_s=duration_s,
            languages=len(languages),
            problems=len(self.problems),
        )
        self._records = []


def talkvid_metadata_file(path: Path) -> Path:
    """``path`` itself, or the one ``filtered_video_clips*.json`` (else ``*.json``) in it.

    A folder with several candidates is ambiguous (the captions file repeats the other's
    ids), so it raises ``ValueError``: pass the file to read.
    """
    if not path.is_dir():
        return path
    found = sorted(path.glob(RELEASE_GLOB)) or sorted(path.glob("*.json"))
    if not found:
        raise FileNotFoundError(f"{path}: no {RELEASE_GLOB} or *.json metadata file")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(f"{path}: several TalkVid metadata files ({names}); pass one file")
    return found[0]


def _load(file: Path) -> tuple[list[Any], bool]:
    """The records (``ValueError`` unless an array) and whether a string held bad bytes."""
    records, undecodable = load_json(file, "TalkVid metadata")
    if not isinstance(records, list):
        raise ValueError(f"{file}: top level is a {type(records).__name__}, expected an array")
    return records, undecodable


def _record_key(
    index: int, record: Any, dataset: str, first_seen: dict[str, int]
) -> tuple[str, ItemFailure | None]:
    """The raw item id of a record, and why it cannot be a clip id (if it cannot)."""
    if not isinstance(record, dict):
        return f"{dataset}-#{index}", _bad("record", f"is a {type(record).__name__}, not an object")
    record_id = record.get("id")
    if not isinstance(record_id, str) or not record_id:
        return f"{dataset}-#{index}", _bad("id", f"is missing or not a string: {record_id!r}")
    raw_id = printable(f"{dataset}-{record_id}")
    if record_id in first_seen:
        first = first_seen[record_id]
        return f"{raw_id}#dup{index}", _bad("id", f"{record_id!r} repeats record {first}")
    first_seen[record_id] = index
    try:
        safe_id(raw_id)
    except UnsafeIdError as exc:
        return raw_id, _bad("id:", str(exc))
    return raw_id, None


def _clip(record: dict[str, Any], clip_id: str, ctx: _Context) -> SourceClip:
    """One record as a SourceClip; ``ItemFailure`` naming the first bad field."""
    info = record.get("info")
    if not isinstance(info, dict):
        raise _bad("info", "is missing or not an object")
    source_id = _source_id(info)
    start_s = _seconds(record, "start-time", "start")
    end_s = _seconds(record, "end-time", "end")
    if start_s >= end_s:
        raise _bad(f"start-time={start_s}", f"is not before end-time={end_s}")
    person = {name: _text(info.get(key)) for name, key in PERSON_FIELDS.items()}
    annotations = TalkvidAnnotations(
        **person,
        description=_text(record.get("description")),
        dover_score=_score(record, "dover_scores", clip_id, ctx),
        cotracker_ratio=_score(record, "cotracker_ratio", clip_id, ctx),
        head_detail=_head_detail(record.get("head_detail"), clip_id, ctx),
        declared_duration_s=_declared_duration(
            record.get("durations"), end_s - start_s, clip_id, ctx
        ),
    )
    return SourceClip(
        dataset=ctx.dataset,
        source_id=source_id,
        clip_id=clip_id,
        url=(ctx.url_template or WATCH_URL).format(id=source_id),
        start_s=start_s,
        end_s=end_s,
        declared_height=_positive(record, "height", clip_id, ctx, integer=True),
        declared_width=_positive(record, "width", clip_id, ctx, integer=True),
        declared_fps=_positive(record, "fps", clip_id, ctx, integer=False),
        licence=ctx.licence,
        speaker=person["person_id"] or source_id,
        language=_text(info.get("Language")),
        talkvid=annotations,
    )


def _source_id(info: dict[str, Any]) -> str:
    key = next((k for k in LINK_KEYS if k in info), LINK_KEYS[0])
    link = info.get(key)
    if not isinstance(link, str):
        raise _bad(f"info[{key!r}]", f"is missing or not a string: {link!r}")
    try:
        return _video_id(link)
    except ValueError as exc:
        raise _bad(f"info[{key!r}]:", str(exc)) from exc


def _finite(value: Any) -> float | None:
    """``value`` as a finite float if it is a JSON number (not a bool), else None."""
    if type(value) is int:  # exact types: bool is not a number here
        try:
            value = float(value)
        except OverflowError:
            return None
    if type(value) is not float:
        return None
    return value if math.isfinite(value) else None


def _seconds(record: dict[str, Any], key: str, fallback: str) -> float:
    """A time in the source video; ``fallback`` is read only when ``key`` is absent (so a
    0.0 start is never mistaken for a missing one)."""
    name = fallback if key not in record and fallback in record else key
    value = record.get(name)
    seconds = _finite(value)
    if seconds is None:
        raise _bad(name, f"is missing or not a finite number: {value!r}")
    if seconds < 0:
        raise _bad(name, f"is negative: {seconds}")
    return seconds


def _text(value: Any) -> str:
    """A string field; numbers are spelled out (``Person ID`` may be 597), others empty."""
    if isinstance(value, str):
        return value
    return str(value) if _finite(value) is not None else ""


def _positive(
    record: dict[str, Any], key: str, clip_id: str, ctx: _Context, *, integer: bool
) -> float | None:
    """A declared height/width (int) or fps (float); unusable values warn and give None."""
    value = record.get(key)
    number = _finite(value)
    if number is None or number <= 0 or (integer and not number.is_integer()):
        ctx.warnings.append(f"{clip_id}: {key} {value!r} unusable, left undeclared")
        return None
    return int(number) if integer else number


def _score(record: dict[str, Any], key: str, clip_id: str, ctx: _Context) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    number = _finite(value)
    if number is None:
        ctx.warnings.append(f"{clip_id}: {key} {value!r} is not a number, ignored")
    return number


def _head_detail(value: Any, clip_id: str, ctx: _Context) -> dict[str, float]:
    """``head_detail.scores`` as floats; non-numeric entries warn and are left out."""
    if value is None:
        return {}
    scores = value.get("scores") if isinstance(value, dict) else None
    if not isinstance(scores, dict):
        ctx.warnings.append(f"{clip_id}: head_detail has no 'scores' object, ignored")
        return {}
    out: dict[str, float] = {}
    for name, raw in scores.items():
        number = _finite(raw)
        if number is None:
            ctx.warnings.append(f"{clip_id}: head_detail.scores.{name} {raw!r} ignored")
        else:
            out[str(name)] = number
    return out


def _declared_duration(value: Any, duration_s: float, clip_id: str, ctx: _Context) -> float | None:
    """The ``durations`` string (``"5.042s"``) in seconds, cross-checked with the times."""
    if value is None:
        return None
    declared: float | None
    if isinstance(value, str):
        try:
            declared = float(value.strip().removesuffix("s"))
        except ValueError:
            declared = None
    else:
        declared = _finite(value)
    if declared is None or not math.isfinite(declared) or declared < 0:
        ctx.warnings.append(f"{clip_id}: durations {value!r} unreadable, ignored")
        return None
    if abs(declared - duration_s) > DURATION_TOLERANCE_S:
        ctx.warnings.append(
            f"{clip_id}: durations {value!r} disagrees with end-time - start-time "
            f"= {duration_s:.3f}s"
        )
    return declared
