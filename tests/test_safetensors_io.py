"""Equal tensors and metadata give equal bytes in every process (artifact sha256 = content)."""

import subprocess
import sys

import torch
from safetensors import safe_open

from models.safetensors_io import save_file

SCRIPT = """
import hashlib, sys, torch
from models.safetensors_io import save_file
save_file({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}, sys.argv[1],
          metadata={"model_spec": "{}", "family": "musetalk2", "code_version": "3", "z": "1"})
print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())
"""


def test_bytes_are_identical_across_processes(tmp_path):
    digests = {
        subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path / f"{i}.safetensors")],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
        for i in range(4)
    }  # fmt: skip
    assert len(digests) == 1


def test_file_reads_back_with_its_tensors_and_metadata(tmp_path):
    path = tmp_path / "x.safetensors"
    tensors = {"w": torch.randn(3, 5), "é": torch.arange(4, dtype=torch.int64)}
    meta = {"b": "2", "a": "ünïcode"}
    save_file(tensors, path, metadata=meta)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta
        for key, value in tensors.items():
            assert torch.equal(f.get_tensor(key), value)
    raw = path.read_bytes()
    assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0  # header padded to alignment
