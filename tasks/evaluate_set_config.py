"""The evaluate_set stage's typed config: no fields of its own yet (resources only).

Apart from :mod:`tasks.evaluate_set` so that validating a pipeline config imports no
metric code.
"""

from __future__ import annotations

from tasks.base import StageConfig


class EvaluateSetConfig(StageConfig):
    pass
