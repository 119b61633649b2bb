"""Reader for CelebV-HQ's ``celebvhq_info.json`` (github CelebV-HQ/CelebV-HQ README format).

One JSON object (≈19 MB, 35,666 clips)::

    {"meta_info": {"appearance_mapping": [40 names], "action_mapping": [35 names]},
     "clips": {"<ytb_id>_<k>": {
         "ytb_id": "M2Ohb0FAaJU",
         "duration": {"start_sec": 81.62, "end_sec": 86.17},          seconds in the source
         "bbox": {"top": 0.0, "bottom": 0.8815, "left": 0.1964, "right": 0.6922},  fractions
         "attributes": {"appearance": [0, 0, 1, ...], "action": [0, ...],  0/1 per mapping name
                        "emotion": {"sep_flag": false, "labels": "neutral"}},
         "version": "v0.1"}}}

With ``sep_flag`` true, ``labels`` is a list of ``{"emotion", "start_sec", "end_sec"}``
whose times are relative to the clip start (official ``init_db.py`` adds the clip start).

Traps handled: the ``mete_info`` spelling of older README versions; attribute names read
from the file's own mappings (their casing is unverified, so none is hard-coded) and a
vector whose length differs from its mapping rejected; YouTube ids starting with ``_`` or
``-`` (the source id is the ``ytb_id`` field, never a split of the key, and clip ids are
``<dataset>-<key>`` so they start with a letter); negative or inverted times (issue #11:
``end_sec < 0``, ``start_sec == end_sec``), NaN and infinity; duplicate keys, which
``json.load`` silently collapses to the last (found with ``object_pairs_hook``: the first
clip wins and each repeat is a problem keyed ``<dataset>-<key>#dup<position>``, so it
never shadows the kept clip).

A clip that cannot be used is returned as ``(raw_id, ItemFailure(BAD_METADATA))`` and the
rest of the file still loads; a file that is not this format at all (not JSON, no
``clips`` object, no attribute mappings) raises ``ValueError`` naming the file.
CelebV-HQ publishes no identity per clip, so ``speaker`` is the source video id.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.store import UnsafeIdError, safe_id
from tasks.base import FailureKind, ItemFailure
from tasks.download.hdtf import WATCH_URL
from tasks.download.json_input import first_undecodable, load_json, printable
from tasks.records import CelebvAnnotations, CropBox, EmotionSegment, NormalizedBox, SourceClip

CELEBVHQ_LICENCE = (
    "non-commercial research only (CelebV-HQ README agreement; videos remain their YouTube owners')"
)
INFO_FILE = "celebvhq_info.json"
META_KEYS: tuple[str, ...] = ("meta_info", "mete_info")  # README spelling, older typo
SEGMENT_TOLERANCE_S = 0.1  # an emotion segment may end this far past the clip end
MIN_CROP_PX = 16

_YOUTUBE_ID = re.compile(r"^[A-Za-z0-9_-]{11}$")

Problem = tuple[str, ItemFailure]


@dataclass(frozen=True)
class CelebvhqSummary:
    clips_in_file: int  # entries in ``clips``, repeated keys included (35,666 per README)
    clips: int  # SourceClip records produced
    unique_source_ids: int
    duration_s: float  # total length of the produced clips
    clips_with_segments: int  # multi-emotion clips (``sep_flag`` true)
    problems: int


@dataclass
class CelebvhqManifest:
    clips: list[SourceClip]
    problems: list[Problem]
    warnings: list[str]
    summary: CelebvhqSummary


@dataclass(frozen=True)
class _Context:
    dataset: str
    licence: str
    url_template: str | None
    appearance: tuple[str, ...]  # the file's attribute mappings
    action: tuple[str, ...]
    repeats: bool  # some object in the file repeats a key: look inside every clip
    undecodable: bool  # some string held an invalid UTF-8 byte: look inside every clip


class _JsonObject(dict[str, Any]):
    """A JSON object that remembers its repeated keys as ``(position, key)``."""

    repeated: tuple[tuple[int, str], ...] = ()

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> _JsonObject:
        obj = cls(pairs)
        if len(obj) == len(pairs):
            return obj
        obj = cls()  # rare: rebuild so that the first occurrence wins
        repeated = []
        for position, (key, value) in enumerate(pairs):
            if key in obj:
                repeated.append((position, key))
            else:
                obj[key] = value
        obj.repeated = tuple(repeated)
        return obj


def _bad(name: str, problem: str) -> ItemFailure:
    return ItemFailure(FailureKind.BAD_METADATA, f"{name} {problem}")


def read_celebvhq(
    path: Path,
    url_template: str | None = None,
    *,
    dataset: str = "celebvhq",
    licence: str = CELEBVHQ_LICENCE,
) -> CelebvhqManifest:
    """Read ``celebvhq_info.json`` (or the folder holding it) into clips and problems.

    ``url_template`` (e.g. ``"file:///mirror/{id}.mp4"``) replaces the YouTube watch URL,
    formatted with the ``ytb_id``. Clip ids are ``<dataset>-<clip key>``.
    """
    path = Path(path)
    file = path / INFO_FILE if path.is_dir() else path
    top, repeats, undecodable = _load(file)
    appearance, action, warnings = _mappings(top, file)
    ctx = _Context(dataset, licence, url_template, appearance, action, repeats, undecodable)
    entries: _JsonObject = top["clips"]
    clips: list[SourceClip] = []
    problems: list[Problem] = [
        (
            printable(f"{dataset}-{key}#dup{pos}"),
            _bad(f"{file.name}: clip key {printable(key)!r}", "appears again"),
        )
        for pos, key in entries.repeated
    ]
    for key, value in entries.items():
        try:
            clips.append(_clip(key, value, ctx))
        except ItemFailure as exc:
            problems.append((printable(f"{dataset}-{key}"), _bad(f"{file.name}:", exc.message)))
    summary = CelebvhqSummary(
        clips_in_file=len(entries) + len(entries.repeated),
        clips=len(clips),
        unique_source_ids=len({c.source_id for c in clips}),
        duration_s=sum(c.duration_s for c in clips),
        clips_with_segments=sum(bool(c.celebvhq and c.celebvhq.emotion_segments) for c in clips),
        problems=len(problems),
    )
    return CelebvhqManifest(clips=clips, problems=problems, warnings=warnings, summary=summary)


def _load(file: Path) -> tuple[_JsonObject, bool, bool]:
    """The top-level object (``ValueError`` if it has no ``clips`` object), whether any
    object in the file repeats a key, and whether any string held an invalid UTF-8 byte."""
    repeats: list[_JsonObject] = []

    def hook(pairs: list[tuple[str, Any]]) -> _JsonObject:
        obj = _JsonObject.from_pairs(pairs)
        if obj.repeated:
            repeats.append(obj)
        return obj

    top, undecodable = load_json(file, "CelebV-HQ info", object_pairs_hook=hook)
    if not isinstance(top, _JsonObject):
        raise ValueError(f"{file}: top level is a {type(top).__name__}, expected an object")
    if top.repeated:
        raise ValueError(f"{file}: top-level key {top.repeated[0][1]!r} appears twice")
    if not isinstance(top.get("clips"), dict):
        raise ValueError(f"{file}: no 'clips' object")
    return top, bool(repeats), undecodable


def _mappings(
    top: dict[str, Any], file: Path
) -> tuple[tuple[str, ...], tuple[str, ...], list[str]]:
    """The attribute name lists from ``meta_info`` (or ``mete_info``); ``ValueError`` if absent."""
    present = [key for key in META_KEYS if key in top]
    if not present:
        raise ValueError(f"{file}: no 'meta_info' (or 'mete_info') with the attribute mappings")
    warnings = []
    if len(present) > 1:
        warnings.append(f"{file.name}: both 'meta_info' and 'mete_info' present, 'meta_info' used")
    meta = top[present[0]]
    names = {}
    for field in ("appearance_mapping", "action_mapping"):
        value = meta.get(field) if isinstance(meta, dict) else None
        if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
            raise ValueError(f"{file}: {present[0]}.{field} is not a list of names")
        names[field] = tuple(value)
    return names["appearance_mapping"], names["action_mapping"], warnings


def _clip(key: str, raw: Any, ctx: _Context) -> SourceClip:
    """One clip entry as a SourceClip; ``ItemFailure`` naming the first bad field."""
    if not isinstance(raw, dict):
        raise _bad("clip", f"is a {type(raw).__name__}, expected an object")
    bad_bytes = first_undecodable({key: raw}) if ctx.undecodable else None
    if bad_bytes:
        raise _bad("clip", f"holds invalid UTF-8 in {bad_bytes}")
    repeated = _first_repeated(raw) if ctx.repeats else None
    if repeated:
        raise _bad(repeated, "appears twice in the clip")
    try:
        clip_id = safe_id(f"{ctx.dataset}-{key}")
    except UnsafeIdError as exc:
        raise _bad("clip key:", str(exc)) from exc
    source_id = raw.get("ytb_id")
    if not isinstance(source_id, str) or not _YOUTUBE_ID.match(source_id):
        raise _bad("ytb_id", f"is not an 11-character YouTube id: {source_id!r}")
    start_s, end_s = _time_range(_section(raw, "duration"), "duration.")
    attributes = _section(raw, "attributes")
    emotion, segments = _emotion(_section(attributes, "emotion", "attributes."), end_s - start_s)
    version = raw.get("version", "")
    if not isinstance(version, str):
        raise _bad("version", f"is not a string: {version!r}")
    annotations = CelebvAnnotations(
        appearance=_decode(attributes.get("appearance"), ctx.appearance, "appearance"),
        actions=_decode(attributes.get("action"), ctx.action, "action"),
        emotion=emotion,
        emotion_segments=segments,
        version=version,
    )
    return SourceClip(
        dataset=ctx.dataset,
        source_id=source_id,
        clip_id=clip_id,
        url=(ctx.url_template or WATCH_URL).format(id=source_id),
        start_s=start_s,
        end_s=end_s,
        bbox=_bbox(_section(raw, "bbox")),
        licence=ctx.licence,
        speaker=source_id,  # no identity per clip is published
        celebvhq=annotations,
    )


def _first_repeated(value: Any, prefix: str = "") -> str | None:
    """Dotted name of the first key repeated anywhere inside ``value``, if any."""
    if isinstance(value, _JsonObject) and value.repeated:
        return prefix + value.repeated[0][1]
    if isinstance(value, dict):
        children = iter(value.items())
    elif isinstance(value, list):
        children = enumerate(value)
    else:
        return None
    for name, child in children:
        if isinstance(child, dict | list):
            found = _first_repeated(child, f"{prefix}{name}.")
            if found:
                return found
    return None


def _section(parent: dict[str, Any], name: str, prefix: str = "") -> dict[str, Any]:
    value = parent.get(name)
    if not isinstance(value, dict):
        raise _bad(prefix + name, "is missing or not an object")
    return value


def _number(value: Any, name: str) -> float:
    """A finite JSON number; bools, strings, null, NaN and infinity are rejected."""
    if value is None:
        raise _bad(name, "is missing")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, f"is not a number: {value!r}")
    try:
        number = float(value)
    except OverflowError as exc:
        raise _bad(name, "is out of range") from exc
    if not math.isfinite(number):
        raise _bad(name, f"is not finite: {value!r}")
    return number


def _time_range(section: dict[str, Any], prefix: str) -> tuple[float, float]:
    """``(start_sec, end_sec)`` with ``0 <= start < end``."""
    start = _number(section.get("start_sec"), f"{prefix}start_sec")
    end = _number(section.get("end_sec"), f"{prefix}end_sec")
    for name, value in (("start_sec", start), ("end_sec", end)):
        if value < 0:
            raise _bad(prefix + name, f"is negative: {value}")
    if start >= end:
        raise _bad(f"{prefix}start_sec={start}", f"is not before {prefix}end_sec={end}")
    return start, end


def _bbox(section: dict[str, Any]) -> NormalizedBox:
    """The face box in frame fractions: each side in [0, 1], top < bottom, left < right."""
    sides = {
        name: _number(section.get(name), f"bbox.{name}") for name in NormalizedBox.model_fields
    }
    for name, value in sides.items():
        if not 0.0 <= value <= 1.0:
            raise _bad(f"bbox.{name}", f"is outside [0, 1]: {value}")
    box = NormalizedBox(**sides)
    if box.top >= box.bottom or box.left >= box.right:
        raise _bad("bbox", f"is empty or inverted: {sides}")
    return box


def _decode(flags: Any, names: tuple[str, ...], field: str) -> tuple[str, ...]:
    """Names whose flag is 1, in mapping order; the vector must match the mapping's length."""
    name = f"attributes.{field}"
    if not isinstance(flags, list):
        raise _bad(name, "is missing or not a list")
    if len(flags) != len(names):
        raise _bad(name, f"has {len(flags)} flags but its mapping has {len(names)} names")
    if not {type(f) for f in flags} <= {int} or not set(flags) <= {0, 1}:
        raise _bad(name, "holds values other than 0 and 1")
    return tuple(n for n, f in zip(names, flags, strict=True) if f == 1)


def _emotion(section: dict[str, Any], duration_s: float) -> tuple[str, tuple[EmotionSegment, ...]]:
    """``(label, ())`` for one emotion, ``("mixed", segments)`` for a ``sep_flag`` clip."""
    flag, labels = section.get("sep_flag"), section.get("labels")
    if not isinstance(flag, bool):
        raise _bad("attributes.emotion.sep_flag", f"is not true or false: {flag!r}")
    if not flag:
        if not isinstance(labels, str) or not labels:
            raise _bad("attributes.emotion.labels", f"is not a label (sep_flag false): {labels!r}")
        return labels, ()
    if not isinstance(labels, list) or not labels:
        raise _bad("attributes.emotion.labels", "is not a list of segments (sep_flag true)")
    segments = tuple(_segment(item, i, duration_s) for i, item in enumerate(labels))
    return "mixed", segments


def _segment(item: Any, index: int, duration_s: float) -> EmotionSegment:
    """One emotion segment, times relative to the clip start and inside the clip."""
    prefix = f"attributes.emotion.labels[{index}]."
    if not isinstance(item, dict):
        raise _bad(prefix.rstrip("."), "is not an object")
    emotion = item.get("emotion")
    if not isinstance(emotion, str) or not emotion:
        raise _bad(prefix + "emotion", f"is not a label: {emotion!r}")
    start, end = _time_range(item, prefix)
    if end > duration_s + SEGMENT_TOLERANCE_S:
        raise _bad(f"{prefix}end_sec={end}", f"is past the clip end ({duration_s:.2f} s)")
    return EmotionSegment(emotion=emotion, start_s=start, end_s=end)


def celebv_crop_box(
    bbox: NormalizedBox, frame_width: int, frame_height: int, *, expand: float = 0.02
) -> CropBox:
    """The official CelebV-HQ square face crop in pixels of a ``frame_width x frame_height`` frame.

    As ``download_and_process.py``: expand each side by ``expand`` (clamped to [0, 1]),
    denormalise with ``round()``, then take a square of side ``2 * c``, ``c = min(h, w) // 2``,
    centred on the box centre. The centre may fall on a half pixel: the corner is floored
    (ffmpeg truncates), shifted inside the frame, and the side rounded down to an even
    number for yuv420p. ``ItemFailure(BAD_METADATA)`` if the square is under 16 px.
    """
    if frame_width <= 0 or frame_height <= 0:
        raise ValueError(f"bad frame size {frame_width}x{frame_height}")
    top = round(max(bbox.top - expand, 0.0) * frame_height)
    bottom = round(min(bbox.bottom + expand, 1.0) * frame_height)
    left = round(max(bbox.left - expand, 0.0) * frame_width)
    right = round(min(bbox.right + expand, 1.0) * frame_width)
    half = min(bottom - top, right - left) // 2
    side = min(2 * half, frame_width, frame_height) // 2 * 2
    if side < MIN_CROP_PX:
        raise ItemFailure(
            FailureKind.BAD_METADATA,
            f"face box {bbox.model_dump()} is {side}px square on a "
            f"{frame_width}x{frame_height} frame, under {MIN_CROP_PX}px",
        )
    x = min(max(math.floor((left + right) / 2 - half), 0), frame_width - side)
    y = min(max(math.floor((top + bottom) / 2 - half), 0), frame_height - side)
    return CropBox(x=x, y=y, w=side, h=side, reference_height=frame_height)
