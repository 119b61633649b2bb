"""Talking-head evaluation metrics: arrays in, numbers out (never imports ``tasks``).

Each metric is a small module with its reference and its network (loaded through
:mod:`models`); :mod:`metrics.registry` lists them with their level (per clip, or over a
set of clips such as FID/FVD), the settings in which they mean something, and direction.
"""

from metrics.registry import METRICS, Level, MetricInfo, Setting, metrics_for

__all__ = ["METRICS", "Level", "MetricInfo", "Setting", "metrics_for"]
