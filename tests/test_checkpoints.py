"""models.checkpoints: weights-only reading, container unwrapping and the fit report."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from models.checkpoints import (
    SHOWN,
    CheckpointError,
    CheckpointMismatchError,
    check_fit,
    load_into,
    read_state_dict,
)
from models.registry import ModelUnavailableError


def _net(seed: int = 0, width: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width), nn.Linear(width, 2))


def _fit_error(state: dict[str, torch.Tensor]) -> CheckpointMismatchError:
    with pytest.raises(CheckpointMismatchError) as info:
        load_into(_net(), state, "net.pt", what="the test net", hint="Try another file.")
    return info.value


def test_errors_are_model_unavailable_errors() -> None:
    assert issubclass(CheckpointMismatchError, CheckpointError)
    assert issubclass(CheckpointError, ModelUnavailableError)


def test_round_trip_loads_strictly(tmp_path: Path) -> None:
    source = _net(seed=1)
    torch.save(source.state_dict(), tmp_path / "net.pt")
    state = read_state_dict(tmp_path / "net.pt")
    target = _net(seed=2)
    load_into(target, state, tmp_path / "net.pt", what="the test net")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_safetensors_file_is_read(tmp_path: Path) -> None:
    source = _net(seed=3)
    save_file(source.state_dict(), tmp_path / "net.safetensors")
    state = read_state_dict(tmp_path / "net.safetensors")
    assert state.keys() == source.state_dict().keys()
    target = _net(seed=4)
    load_into(target, state, tmp_path / "net.safetensors", what="the test net")
    assert torch.equal(target[0].weight, source[0].weight)


def test_misshaped_key_names_both_shapes() -> None:
    state = _net().state_dict()
    state["2.weight"] = torch.zeros(2, 5)
    err = _fit_error(state)
    assert err.misshaped == (("2.weight", (2, 5), (2, 4)),)
    assert (err.missing, err.unexpected) == ((), ())
    assert str(err) == (
        "net.pt does not fit the test net: 0 missing, 0 unexpected, 1 mis-shaped keys\n"
        "  mis-shaped: 2.weight: checkpoint (2, 5) vs model (2, 4)\n"
        "Try another file."
    )


def test_missing_and_unexpected_keys_are_listed() -> None:
    state = _net().state_dict()
    state["3.weight"] = state.pop("2.weight")
    err = _fit_error(state)
    assert (err.missing, err.unexpected, err.misshaped) == (("2.weight",), ("3.weight",), ())
    message = str(err)
    assert "1 missing, 1 unexpected, 0 mis-shaped keys" in message
    assert "\n  missing: 2.weight\n  unexpected: 3.weight\n" in message


def test_long_lists_are_cut_after_the_first_few() -> None:
    state = _net().state_dict()
    for i in range(SHOWN + 3):
        state[f"extra.{i}"] = torch.zeros(1)
    err = _fit_error(state)
    assert len(err.unexpected) == SHOWN + 3
    assert f"extra.{SHOWN - 1}; … (+3 more)" in str(err)
    assert f"extra.{SHOWN}" not in str(err)


def test_missing_batchnorm_counter_is_filled_in() -> None:
    source = _net(seed=5)
    source[1].num_batches_tracked.fill_(7)
    state = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    target = _net(seed=6)
    target[1].num_batches_tracked.fill_(9)
    load_into(target, state, "net.pt", what="the test net")
    assert torch.equal(target[1].running_mean, source[1].running_mean)
    assert int(target[1].num_batches_tracked) == 9  # BatchNorm kept its own counter
    del state["1.running_mean"]
    with pytest.raises(CheckpointMismatchError, match=r"\n  missing: 1\.running_mean$"):
        check_fit(target, state, "net.pt", what="the test net")


def test_pickled_object_is_refused(tmp_path: Path) -> None:
    state = _net().state_dict()
    torch.save({"state_dict": state, "args": Namespace(lr=1.0)}, tmp_path / "full.ckpt")
    with pytest.raises(CheckpointError) as info:
        read_state_dict(tmp_path / "full.ckpt", containers=("state_dict",), hint="Convert it.")
    assert str(info.value) == (
        f"weights_only loading refused {tmp_path / 'full.ckpt'}: not a plain state dict of "
        "tensors (it needs argparse.Namespace); code from a checkpoint is never unpickled "
        "here. Convert it."
    )
    assert not isinstance(info.value, CheckpointMismatchError)


def test_containers_and_prefix_are_unwrapped(tmp_path: Path) -> None:
    state = _net().state_dict()
    wrapped = {"model": {"state_dict": {f"module.{k}": v for k, v in state.items()}}}
    torch.save(wrapped, tmp_path / "wrapped.pt")
    out = read_state_dict(
        tmp_path / "wrapped.pt", containers=("model", "state_dict"), strip_prefix="module."
    )
    assert out.keys() == state.keys()
    with pytest.raises(CheckpointError, match=r"non-tensor entries \(1\): 'model' \(dict\)$"):
        read_state_dict(tmp_path / "wrapped.pt")


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    torch.save(_net().state_dict(), tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"cannot read .*cut\.pt as a torch checkpoint"):
        read_state_dict(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt"):
        read_state_dict(tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint either")
    with pytest.raises(CheckpointError, match=r"cannot read .*junk\.safetensors"):
        read_state_dict(tmp_path / "junk.safetensors")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match=r"tensor\.pt holds a Tensor, not a state dict"):
        read_state_dict(tmp_path / "tensor.pt")
