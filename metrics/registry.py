"""The metric registry: what each metric is, where it applies, which network it needs.

``level``: ``clip`` metrics are computed per generated clip and averaged over clips; ``set``
metrics (FID, FVD) compare the feature distributions of all generated vs all ground-truth
clips and exist only for the set. ``settings``: self-reconstruction (the clip's own audio:
the ground truth is the target, so paired metrics apply) and cross-audio (another clip's
audio: only unpaired metrics, identity, pose and sync apply), as in MuseTalk's and
LatentSync's tables. ``network``: the model family (``talkforge models``) it runs, if any.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Level(StrEnum):
    CLIP = "clip"
    SET = "set"


class Setting(StrEnum):
    SELF = "self"  # own audio: reconstruction of the ground truth
    CROSS = "cross"  # another held-out clip's audio


@dataclass(frozen=True, slots=True)
class MetricInfo:
    name: str
    level: Level
    settings: frozenset[Setting]
    higher_is_better: bool
    unit: str
    network: str | None
    reference: str


METRICS: dict[str, MetricInfo] = {}
_BOTH = frozenset({Setting.SELF, Setting.CROSS})
_SELF = frozenset({Setting.SELF})


def register(info: MetricInfo) -> MetricInfo:
    if info.name in METRICS:
        raise ValueError(f"metric {info.name!r} registered twice")
    METRICS[info.name] = info
    return info


def base_metric(key: str) -> str:
    """``acd_at_32`` → ``acd``; ``fvd_at_128`` → ``fvd``; others unchanged."""
    return key.split("_at_")[0]


def for_setting(values: dict[str, float], setting: Setting) -> dict[str, float]:
    """The values of the metrics that mean something in ``setting`` (see :data:`METRICS`)."""
    return {k: v for k, v in values.items() if setting in METRICS[base_metric(k)].settings}


def metrics_for(setting: Setting, level: Level | None = None) -> list[MetricInfo]:
    """The metrics that apply in ``setting`` (optionally of one level), in registry order."""
    return [
        m for m in METRICS.values() if setting in m.settings and (level is None or m.level == level)
    ]


for _info in (
    MetricInfo("psnr_db", Level.CLIP, _SELF, True, "dB", None, "per-frame 10·log10(255²/MSE)"),
    MetricInfo("ssim", Level.CLIP, _SELF, True, "", None, "skimage SSIM, 7×7 uniform, range 255"),
    MetricInfo("lpips_alex", Level.CLIP, _SELF, False, "", "lpips-alex", "LPIPS v0.1 AlexNet"),
    MetricInfo("lpips_vgg", Level.CLIP, _SELF, False, "", "lpips-vgg", "LPIPS v0.1 VGG-16"),
    MetricInfo("fid", Level.SET, _BOTH, False, "", "inception-fid", "pytorch-fid TF Inception"),
    MetricInfo("fvd", Level.SET, _SELF, False, "", "i3d", "I3D, frames 20–36 at 224 px"),
    MetricInfo("csim", Level.CLIP, _BOTH, True, "", "arcface", "ArcFace cosine to reference"),
    MetricInfo("acd", Level.CLIP, _BOTH, False, "", "arcface", "ArcFace frame-to-frame distance"),
    MetricInfo("apd_deg", Level.CLIP, _BOTH, False, "deg", "liveportrait-motion", "mean |Δpose|"),
    MetricInfo("sync_c", Level.CLIP, _BOTH, True, "", "syncnet", "syncnet_python LSE-C"),
    MetricInfo("sync_d", Level.CLIP, _BOTH, False, "", "syncnet", "syncnet_python LSE-D"),
    MetricInfo("av_offset_frames", Level.CLIP, _BOTH, False, "frames", "syncnet", "argmin lag"),
):
    register(_info)
