"""Official checkpoints, read safely and checked against the module they are meant for.

Two steps every in-project loader shares:

- :func:`read_state_dict`: a weights file → ``{name: tensor}`` without running code from
  it (safetensors, or ``torch.load(weights_only=True)``), unwrapping the containers a given
  family's checkpoints use.
- :func:`load_into`: compare that state dict with the module's own (:func:`check_fit`) and
  load it strictly; a mismatch raises :class:`CheckpointMismatchError` with one readable
  report for every family.

Both errors derive from :class:`~models.registry.ModelUnavailableError`, which the CLI and
the pipeline stages already catch to tell the user how to fix their weights.

Official checkpoints that pickle more than tensors (PyTorch Lightning ``.ckpt`` files with
callbacks and hyper-parameter objects) are read once, at import, by
:func:`read_dropping_objects`, and converted to safetensors by their family's importer.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import re
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from models.registry import ModelUnavailableError

SHOWN = 5  # names listed per kind of problem; the rest are only counted
_FILLED_ON_LOAD = "num_batches_tracked"  # BatchNorm sets it when a checkpoint lacks it


class CheckpointError(ModelUnavailableError):
    """A weights file cannot be read as a state dict of tensors; the message names the file."""


class CheckpointMismatchError(CheckpointError):
    """A state dict does not fit its module: missing, unexpected or mis-shaped keys.

    ``missing`` and ``unexpected`` hold all such key names; ``misshaped`` holds
    ``(name, checkpoint shape, model shape)`` for every key whose shapes differ.
    """

    def __init__(
        self,
        message: str,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        misshaped: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    ) -> None:
        super().__init__(message)
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.misshaped = tuple(misshaped)


def read_state_dict(
    path: str | Path,
    *,
    containers: Iterable[str] = (),
    strip_prefix: str = "",
    hint: str = "",
) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, on the CPU, read without running code from it.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(map_location="cpu", weights_only=True)``, which refuses pickles that would
    build other objects (whole modules, argparse namespaces, Lightning hyper-parameters).
    Such a refusal raises :class:`CheckpointError` naming the file and, when torch says, the
    object it needed, followed by ``hint`` (a sentence saying how to convert the file); any
    other unreadable file raises it too, naming the file.

    Then, for each key of ``containers`` in turn, a mapping stored under that key replaces
    the whole (``{"state_dict": {...}}`` → ``{...}``), and ``strip_prefix`` (e.g.
    DataParallel's ``"module."``) is removed from the front of every key. The result must
    map strings to tensors, else :class:`CheckpointError` names the offending entries.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            raw: object = load_file(path, device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needed = re.search(r"GLOBAL (\S+)", str(exc))
        message = (
            f"weights_only loading refused {path}: not a plain state dict of tensors"
            + (f" (it needs {needed.group(1)})" if needed else "")
            + "; code from a checkpoint is never unpickled here."
        )
        raise CheckpointError(f"{message} {hint}" if hint else message) from exc
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    except Exception as exc:  # a corrupt torch file fails in many types (KeyError, EOFError...)
        raise CheckpointError(
            f"cannot read {path} as a torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    for key in containers:
        if isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping):
            raw = raw[key]
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a state dict")
    bad = [
        f"{k!r} ({type(v).__name__})"
        for k, v in raw.items()
        if not (isinstance(k, str) and isinstance(v, torch.Tensor))
    ]
    if bad:
        raise CheckpointError(
            f"{path} is not a state dict of tensors; non-tensor entries ({len(bad)}): {_first(bad)}"
        )
    return {k.removeprefix(strip_prefix): v for k, v in raw.items()}


class DroppedObject:
    """Stand-in for an object a checkpoint pickles but :func:`read_dropping_objects` never
    builds: its class is not imported, and constructing, restoring or filling it (the
    pickle opcodes NEWOBJ, REDUCE, BUILD, SETITEMS, APPENDS, ADDITEMS) does nothing."""

    qualified_name = ""  # the global the checkpoint named, e.g. "pytorch_lightning.…"

    def __new__(cls, *args: Any, **kwargs: Any) -> DroppedObject:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def add(self, item: Any) -> None:
        pass


def read_dropping_objects(path: str | Path) -> tuple[Any, list[str]]:
    """A torch checkpoint's content with every object that is not a tensor, storage or plain
    container replaced by an inert :class:`DroppedObject`.

    ``torch.load`` runs with a restricted unpickler: a global the pickle names resolves only
    if torch's weights-only allowlist holds it (tensor and storage rebuilders, dtypes,
    ``OrderedDict``, ``set`` …); every other one — a Lightning callback, an
    ``AttributeDict`` or ``DictConfig`` of hyper-parameters, a numpy scalar, or a function
    such as ``builtins.exec`` that a hostile ``__reduce__`` would call — resolves to a
    fresh ``DroppedObject`` subclass named after it, so nothing from the file is imported
    or runs, and ``pytorch_lightning`` is not needed. (torch's own ``weights_only`` mode
    refuses such files outright.) Returns (content, the dropped globals' names, sorted); an
    unreadable file raises :class:`CheckpointError`.
    """
    from torch._weights_only_unpickler import _get_allowed_globals

    allowed = _get_allowed_globals()
    dropped: set[str] = set()

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            # protocol-2 pickles (torch.save's) name builtins the Python 2 way
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            qualified = f"{module}.{name}"
            if qualified in allowed:
                return allowed[qualified]
            dropped.add(qualified)
            return type(f"Dropped[{qualified}]", (DroppedObject,), {"qualified_name": qualified})

    def load(file: Any, **kwargs: Any) -> Any:  # torch's legacy (non-zip) format calls it
        return RestrictedUnpickler(file, **kwargs).load()

    restricted = types.ModuleType("restricted_pickle")  # what torch.load's pickle_module needs
    restricted.Unpickler, restricted.load = RestrictedUnpickler, load  # type: ignore[attr-defined]
    path = Path(path)
    try:
        content = torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted)
    except Exception as exc:  # not a torch checkpoint, truncated, a misused stand-in, ...
        raise CheckpointError(
            f"cannot read {path} as a torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    return content, sorted(dropped)


def _first(items: list[str]) -> str:
    more = len(items) - SHOWN
    return "; ".join(items[:SHOWN]) + (f"; … (+{more} more)" if more > 0 else "")


def check_fit(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | Path,
    *,
    what: str,
    hint: str = "",
) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state`` has ``model``'s keys and shapes.

    A missing BatchNorm ``num_batches_tracked`` is not a mismatch: older checkpoints lack it
    and :func:`load_into` lets BatchNorm fill it in. The report reads::

        SOURCE does not fit WHAT: M missing, U unexpected, S mis-shaped keys
          missing: NAME; NAME; …
          unexpected: NAME; …
          mis-shaped: NAME: checkpoint (A, B) vs model (C, D); …
        HINT

    listing only the kinds that occur, each in the model's (or the file's) key order, at
    most :data:`SHOWN` names then ``… (+N more)``.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith(_FILLED_ON_LOAD)]
    unexpected = [k for k in state if k not in own]
    misshaped = [
        (k, tuple(state[k].shape), tuple(own[k].shape))
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if not (missing or unexpected or misshaped):
        return
    lines = [
        f"{source} does not fit {what}: {len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(misshaped)} mis-shaped keys"
    ]
    shapes = [f"{k}: checkpoint {a} vs model {b}" for k, a, b in misshaped]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            lines.append(f"  {label}: {_first(items)}")
    if hint:
        lines.append(hint)
    raise CheckpointMismatchError("\n".join(lines), missing, unexpected, misshaped)


def load_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | Path,
    *,
    what: str,
    hint: str = "",
    assign: bool = False,
) -> None:
    """:func:`check_fit`, then ``model.load_state_dict(state, strict=True, assign=assign)``.

    ``assign=True`` adopts the tensors themselves (for a model built on the meta device).
    """
    check_fit(model, state, source, what=what, hint=hint)
    # a plain dict carries no ``_metadata``, so BatchNorm fills a missing num_batches_tracked
    model.load_state_dict(dict(state), strict=True, assign=assign)
