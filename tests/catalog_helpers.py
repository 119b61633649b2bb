"""Catalog test material (tests and benchmarks/bench_catalog.py): TalkVid-format manifests
of any size, and the previous parquet-part catalog code loaded from git history.

Records follow the release's published layout (``tasks/download/talkvid.py``): 11-character
YouTube ids shared by four clips each, a speaker per seven clips, scores, head detail and
a ``durations`` string, so a generated record costs what a real one costs to read.
"""

from __future__ import annotations

import importlib.util
import json
import random
import string
import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_ALPHABET = string.ascii_letters + string.digits + "-_"


def write_talkvid_manifest(path: Path, records: int, seed: int = 0, *, offset: int = 0) -> Path:
    """Write ``records`` TalkVid records (ids ``offset``.. on) as one JSON array; returns path."""
    rng = random.Random(seed)
    videos = ["".join(rng.choice(_ALPHABET) for _ in range(11)) for _ in range(records // 4 + 1)]
    with open(path, "w") as f:
        f.write("[")
        for i in range(records):
            video = videos[i // 4]
            start_s = round(rng.uniform(0, 300), 3)
            length_s = round(rng.uniform(3, 15), 3)
            record = {
                "id": f"video{video}-scene{offset + i}-scene1",
                "height": 1080,
                "width": 1920,
                "fps": 25.0,
                "start-time": start_s,
                "start-frame": int(start_s * 25),
                "end-time": start_s + length_s,
                "end-frame": int((start_s + length_s) * 25),
                "durations": f"{length_s:.3f}s",
                "info": {
                    "Person ID": str((offset + i) // 7),
                    "Ethnicity": "White",
                    "Age Group": "31-45",
                    "Gender": "Female",
                    "Video Link": f"https://www.youtube.com/watch?v={video}",
                    "Language": rng.choice(["English", "Thai", "Polish"]),
                    "Video Category": "Personal Experience",
                },
                "description": "A woman talks to the camera about her day. " * 3,
                "dover_scores": round(rng.uniform(5, 10), 2),
                "cotracker_ratio": round(rng.uniform(0.8, 1), 3),
                "head_detail": {"scores": {"avg_movement": 97.9, "min_movement": 89.4}},
            }
            f.write(("," if i else "") + json.dumps(record))
        f.write("]")
    return path


OLD_COMMIT = "3c6e47d"  # the last commit with the parquet-part catalog


def load_old_code(folder: Path) -> dict[str, types.ModuleType]:
    """``storage/schema.py``, ``storage/catalog.py`` and ``talkforge/ops.py`` as they were at
    :data:`OLD_COMMIT`, loaded from git history into modules ``old_schema``, ``old_catalog``
    and ``old_ops`` (written under ``folder``; nothing of them lives in the tree).

    Raises ``FileNotFoundError`` when the history is not there (a shallow clone).
    """
    folder.mkdir(parents=True, exist_ok=True)
    modules = {}
    for name, path in (
        ("old_schema", "storage/schema.py"),
        ("old_catalog", "storage/catalog.py"),
        ("old_ops", "talkforge/ops.py"),
    ):
        shown = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{OLD_COMMIT}:{path}"],
            capture_output=True,
            text=True,
            check=False,
        )
        if shown.returncode:
            raise FileNotFoundError(f"git history of {path} at {OLD_COMMIT}: {shown.stderr}")
        text = shown.stdout.replace("from storage.schema import", "from old_schema import")
        text = text.replace("from storage.catalog import", "from old_catalog import")
        file = folder / f"{name}.py"
        file.write_text(text)
        spec = importlib.util.spec_from_file_location(name, file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        modules[name] = module
    return modules
