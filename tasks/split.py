"""Deterministic train / held-out split by clip id.

A clip is held out when a seeded hash of its id falls under ``holdout_fraction``. The
decision depends only on (id, seed, fraction), so it is stable across runs, machines and
dataset growth: adding clips never moves an existing clip between splits.
"""

from __future__ import annotations

import hashlib

from tasks.base import StageEnv


def heldout_score(item_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_heldout(item_id: str, env: StageEnv) -> bool:
    return heldout_score(item_id, env.split_seed) < env.holdout_fraction
