"""``talkforge models``: list what a config needs, import, verify, and fail runs early."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from models.registry import ModelSpec, ensure_model
from storage.catalog import Catalog
from talkforge.cli import app


@pytest.fixture(scope="module")
def tiny_hubert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random HuBERT folder built by the real builder (stands in for official files)."""
    root = tmp_path_factory.mktemp("weights")
    return ensure_model(ModelSpec(family="hubert", source="hubert", tiny_random=True), root)


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "models.yaml"
    cfg.write_text(
        f"project: {{data_root: {tmp_path / 'data'}}}\n"
        "features:\n"
        "  hubert: {family: hubert, source: ./models/hubert-large, tiny_random: false}\n"
    )
    return cfg


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _text(result) -> str:
    """CLI output with rich's line wrapping undone (wraps move with the tmp path length)."""
    return " ".join(result.output.split())


def test_list_shows_missing_weights_and_the_command_to_fix_them(tmp_path: Path):
    cfg = _config(tmp_path)
    out = _invoke("models", "list", "--config", str(cfg), "--format", "json")
    rows = {r["family"]: r for r in json.loads(out.output)}
    assert rows["hubert"]["status"] == "missing"
    assert rows["hubert"]["expected_at"] == str(tmp_path / "data" / "models" / "hubert-large")
    assert rows["vae-flux1"]["status"] == "tiny-random"
    assert rows["mtcnn"]["status"] == "present"  # real weights shipped in facenet-pytorch
    table = _invoke("models", "list", "--config", str(cfg))
    assert table.exit_code == 1
    assert "talkforge models import hubert PATH" in _text(table)


def test_run_with_missing_weights_stops_before_anything_runs(tmp_path: Path):
    cfg = _config(tmp_path)
    result = _invoke("run", "--config", str(cfg), "--stages", "features")
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "missing weights, nothing was run" in text
    assert "talkforge models import hubert" in text
    runs = Catalog(tmp_path / "data" / "catalog").query("SELECT * FROM runs").num_rows
    assert runs == 0


def test_import_then_verify_then_detect_tampering(tmp_path: Path, tiny_hubert: Path):
    cfg = _config(tmp_path)
    imported = _invoke("models", "import", "hubert", str(tiny_hubert), "--config", str(cfg))
    assert imported.exit_code == 0, imported.output
    dest = tmp_path / "data" / "models" / "hubert-large"
    originals = sorted(p.name for p in tiny_hubert.iterdir() if not p.name.startswith("."))
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == originals
    assert not list(dest.parent.glob(".tmp-import-*"))
    listed = _invoke("models", "list", "--config", str(cfg), "--format", "json")
    status = {r["family"]: r["status"] for r in json.loads(listed.output)}
    assert status["hubert"].startswith("present")
    assert _invoke("models", "verify", "hubert", "--config", str(cfg)).exit_code == 0

    again = _invoke("models", "import", "hubert", str(tiny_hubert), "--config", str(cfg))
    assert again.exit_code == 2 and "already exists" in _text(again)

    weights = next(dest.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    tampered = _invoke("models", "verify", "hubert", "--config", str(cfg))
    assert tampered.exit_code == 1
    assert f"{weights.name}: size or sha256 changed since import" in " ".join(
        tampered.output.split()
    )


def test_import_checks_the_expected_sha256_of_a_file(tmp_path: Path, tiny_hubert: Path):
    cfg = tmp_path / "file.yaml"
    cfg.write_text(
        f"project: {{data_root: {tmp_path / 'data'}}}\n"
        "faces: {detector: retinaface, retinaface_weights: models/retinaface.pth}\n"
    )
    weights = next(tiny_hubert.glob("*.safetensors"))
    wrong = _invoke(
        "models", "import", "retinaface", str(weights), "--sha256", "0" * 64, "--config", str(cfg)
    )
    assert wrong.exit_code == 2 and "sha256 mismatch" in _text(wrong)
    assert not (tmp_path / "data" / "models" / "retinaface.pth").exists()
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    right = _invoke(
        "models", "import", "retinaface", str(weights), "--sha256", digest, "--config", str(cfg)
    )
    assert right.exit_code == 0, right.output
    ok = _invoke("models", "verify", "retinaface", "--sha256", digest, "--config", str(cfg))
    assert ok.exit_code == 0, ok.output


def test_download_is_refused_offline_and_for_local_models(tmp_path: Path, monkeypatch):
    cfg = tmp_path / "hub.yaml"
    cfg.write_text(
        f"project: {{data_root: {tmp_path / 'data'}}}\n"
        "features:\n"
        "  hubert: {family: hubert, source: facebook/hubert-large-ls960-ft}\n"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = _invoke("models", "download", "hubert", "--config", str(cfg))
    assert out.exit_code == 2 and "HF_HUB_OFFLINE" in _text(out)
    local = _invoke("models", "download", "vae-flux1", "--config", str(cfg))
    assert local.exit_code == 2 and "models import" in " ".join(local.output.split())
