"""Registry of model families, and the discriminated config union the train stage validates.

A family registers with the :func:`register` class decorator when its package is
imported; :data:`BUILTIN_MODULES` lists the packages imported on first lookup, so the
registry is complete however it is reached (CLI, stage worker, training rank). A family
package that fails to import is an error at lookup, not a silently missing family.

:func:`config_union` turns the registered families' configs into one pydantic type:
``base`` (the train stage's own fields) merged with each family's config, discriminated
by ``family`` with a default, so ``train: {steps: 20}`` means ``musetalk15`` and
``train: {family: nope}`` fails at start naming the registered families.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Any, Union, get_args

from pydantic import BaseModel, BeforeValidator, Discriminator, Tag

from generators.family import FamilyConfig, ModelFamily

DEFAULT_FAMILY = "musetalk15"
BUILTIN_MODULES: tuple[str, ...] = (
    "generators.musetalk15",
    "generators.musetalk2",
    "generators.dualforce",
)

_FAMILIES: dict[str, type[ModelFamily]] = {}
_loaded = False


def register(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: add a family under ``cls.name`` (its config's ``family`` tag)."""
    tag = cls.config_type.model_fields["family"]
    if get_args(tag.annotation) != (cls.name,) or tag.default != cls.name:
        raise TypeError(
            f"{cls.__name__}: config_type.family must be Literal[{cls.name!r}] = {cls.name!r}"
        )
    if cls.spec_type.model_fields["family"].default != cls.name:
        raise TypeError(f"{cls.__name__}: spec_type.family must default to {cls.name!r}")
    known = _FAMILIES.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"model family {cls.name!r} is already registered by {known.__name__}")
    _FAMILIES[cls.name] = cls
    return cls


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
        _loaded = True


def names() -> list[str]:
    """Registered family names, sorted."""
    _load_builtins()
    return sorted(_FAMILIES)


def get(name: str) -> type[ModelFamily]:
    """The family class registered as ``name``; ``KeyError`` naming the known ones."""
    _load_builtins()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; registered: {names()}") from None


def family_config(config: BaseModel) -> FamilyConfig:
    """The family part of a merged stage config (or a plain family config), as its own type."""
    cls = get(str(config.family)).config_type  # type: ignore[attr-defined]
    return cls.model_validate(config.model_dump(include=set(cls.model_fields)))


def instantiate(config: BaseModel) -> ModelFamily:
    """The family object for a (merged or plain) config carrying ``family``."""
    return get(str(config.family))(family_config(config))  # type: ignore[attr-defined]


def _tag(value: Any, default: str) -> str:
    if isinstance(value, dict):
        return str(value.get("family", default))
    return str(getattr(value, "family", default))


def config_union(base: type[BaseModel] | None = None, default: str = DEFAULT_FAMILY) -> Any:
    """``Annotated[Union[...], Discriminator]`` over every registered family's config.

    With ``base``, each member is ``base`` merged with the family's config (``base``'s
    fields must not clash with a family's); without, the members are the family configs.
    Validate a value with ``pydantic.TypeAdapter(union)`` or use it as a field type.
    """
    members = []
    for name in names():
        cfg = _FAMILIES[name].config_type
        if base is not None:
            clash = (set(base.model_fields) & set(cfg.model_fields)) - {"family"}
            if clash:
                raise TypeError(f"family {name!r} config reuses stage fields {sorted(clash)}")
            cfg = type(f"{base.__name__}_{name}", (base, cfg), {"__module__": base.__module__})
        members.append(Annotated[cfg, Tag(name)])

    def known(value: Any) -> Any:
        tag = _tag(value, default)
        if tag not in _FAMILIES:
            raise ValueError(f"unknown model family {tag!r}; registered: {', '.join(names())}")
        return value

    return Annotated[
        Union[tuple(members)],  # noqa: UP007 - built at runtime from the registry
        Discriminator(lambda v: _tag(v, default)),
        BeforeValidator(known),
    ]
