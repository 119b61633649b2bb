"""Train / held-out split by speaker or source video: deterministic, recorded, stable.

Clips of one person (or one source video) on both sides of a split leak identity into the
evaluation: a model that has seen the speaker's face scores CSIM and FID it never earned. So
the unit of the split is a **group** of clips, never a clip:

- ``group_by: speaker`` (default): ``<dataset>/speaker/<speaker>`` from the manifest (HDTF's
  WDA/WRA person names, TalkVid's person id); a clip without a speaker label falls back to
  its source video; CelebV-HQ publishes no identity, so its speaker is the source video;
- ``group_by: source_video``: ``<dataset>/video/<source_id>``.

**Rule.** ``hash``: a group is held out when ``sha256(seed:group)`` read as a fraction is
below ``holdout_fraction``. The decision depends only on (group, seed, fraction), so it is
the same on every machine and run, and adding clips never moves a clip between sides (a new
clip of a known group joins its group's side; a new group decides for itself).
``musetalk_hdtf_val``: MuseTalk's 20 HDTF validation videos (``val_list_hdtf`` in its
``configs/training/preprocess.yaml``; ``RD_Radio7_000`` names video ``RD_Radio7``, ``_000``
being MuseTalk's own 30 s segment index) — every group holding one of those videos is
held out (with ``group_by: speaker`` the whole speaker: ``WDA_XavierBecerra`` and
``WRA_SteveScalise1``'s other videos never train), everything else trains.

The engine plans the split once per run from the current manifest
(:func:`plan_split`), records it in the catalog (``splits``) and hands each stage that uses
it the held-out clip ids in :class:`~tasks.base.StageEnv` (``heldout_ids``).
:func:`is_heldout` is what stages ask. Without a planned split (library use, unit tests:
``heldout_ids`` is ``None``) there is no manifest to group by, so each clip is its own group.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

from tasks.base import StageEnv, stable_hash

GroupBy = Literal["speaker", "source_video"]
SplitRule = Literal["hash", "musetalk_hdtf_val"]
HDTF_SUBSETS = ("RD", "WDA", "WRA")
MUSETALK_HDTF_VAL: tuple[str, ...] = (
    "RD_Radio7_000", "RD_Radio8_000", "RD_Radio9_000", "WDA_TinaSmith_000",
    "WDA_TomCarper_000", "WDA_TomPerez_000", "WDA_TomUdall_000", "WDA_VeronicaEscobar0_000",
    "WDA_VeronicaEscobar1_000", "WDA_WhipJimClyburn_000", "WDA_XavierBecerra_000",
    "WDA_XavierBecerra_001", "WDA_XavierBecerra_002", "WDA_ZoeLofgren_000",
    "WRA_SteveScalise1_000", "WRA_TimScott_000", "WRA_ToddYoung_000", "WRA_TomCotton_000",
    "WRA_TomPrice_000", "WRA_VickyHartzler_000",
)  # fmt: skip


def heldout_score(key: str, seed: int) -> float:
    """``sha256(seed:key)`` as a fraction in ``[0, 1)``."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_heldout(item_id: str, env: StageEnv) -> bool:
    """Whether clip ``item_id`` is held out from engram / train (generated and evaluated)."""
    if env.heldout_ids is not None:
        return item_id in env.heldout_ids
    return heldout_score(item_id, env.split_seed) < env.holdout_fraction


@dataclass(frozen=True, slots=True)
class SplitClip:
    """What the split needs to know of a clip (one ``current_manifest`` row)."""

    clip_id: str
    dataset: str
    source_id: str
    speaker: str = ""
    subset: str = ""


def group_of(clip: SplitClip, group_by: GroupBy) -> str:
    if group_by == "speaker" and clip.speaker:
        return f"{clip.dataset}/speaker/{clip.speaker}"
    return f"{clip.dataset}/video/{clip.source_id}"


def hdtf_video(clip: SplitClip) -> str | None:
    """``<subset>_<name>`` of an HDTF-format clip id (``<dataset>-<subset>-<name>_<k>``)."""
    prefix = f"{clip.dataset}-{clip.subset}-"
    if clip.subset not in HDTF_SUBSETS or not clip.clip_id.startswith(prefix):
        return None
    name = clip.clip_id[len(prefix) :].rsplit("_", 1)[0]
    return f"{clip.subset}_{name}" if name else None


@dataclass
class SplitPlan:
    """A planned split: every clip's group and side, and what the rule said."""

    rule: str  # human-readable: the rule and its parameters
    groups: dict[str, str] = field(default_factory=dict)  # clip id -> group
    heldout_groups: frozenset[str] = frozenset()

    @property
    def heldout_ids(self) -> frozenset[str]:
        return frozenset(c for c, g in self.groups.items() if g in self.heldout_groups)

    @property
    def split_hash(self) -> str:
        return stable_hash({"rule": self.rule, "heldout": sorted(self.heldout_ids),
                            "clips": sorted(self.groups)})  # fmt: skip

    def counts(self) -> dict[str, int]:
        held = self.heldout_ids
        return {
            "groups": len(set(self.groups.values())),
            "heldout_groups": len(self.heldout_groups),
            "clips": len(self.groups),
            "heldout_clips": len(held),
            "train_clips": len(self.groups) - len(held),
        }

    def problem(self) -> str:
        """Why this split cannot evaluate or train anything (``""`` when it can)."""
        c = self.counts()
        if not c["clips"]:
            return ""
        if not c["heldout_clips"]:
            return (
                f"split holds out no clip: {c['groups']} source group(s) under {self.rule}; "
                "raise split.holdout_fraction, change split.seed or add sources"
            )
        if not c["train_clips"]:
            return f"split holds out every clip ({c['groups']} group(s) under {self.rule})"
        return ""

    def rows(self) -> list[dict[str, str]]:
        """One row per clip for the catalog's ``splits`` table."""
        held = self.heldout_groups
        return [
            {"clip_id": c, "group_key": g, "side": "heldout" if g in held else "train",
             "rule": self.rule, "split_hash": self.split_hash}
            for c, g in sorted(self.groups.items())
        ]  # fmt: skip


def plan_split(
    clips: list[SplitClip],
    *,
    holdout_fraction: float,
    seed: int,
    group_by: GroupBy = "speaker",
    rule: SplitRule = "hash",
) -> SplitPlan:
    """Group ``clips`` and decide each group's side (see module docstring)."""
    groups = {c.clip_id: group_of(c, group_by) for c in clips}
    members: dict[str, list[SplitClip]] = defaultdict(list)
    for c in clips:
        members[groups[c.clip_id]].append(c)
    if rule == "musetalk_hdtf_val":
        listed = {v.rsplit("_", 1)[0] for v in MUSETALK_HDTF_VAL}
        held = {g for g, cs in members.items() if any(hdtf_video(c) in listed for c in cs)}
        text = f"musetalk_hdtf_val by {group_by}"
    else:
        held = {g for g in members if heldout_score(g, seed) < holdout_fraction}
        text = f"hash by {group_by}, seed {seed}, holdout_fraction {holdout_fraction:g}"
    return SplitPlan(rule=text, groups=groups, heldout_groups=frozenset(held))
