"""Registry of model families, and the discriminated config union the train stage validates.

The built-in families are listed in :data:`BUILTINS`: per name, the import paths of its
config class (in the family's torch-free ``config`` module) and of its family class.
Validating a train section reads only the configs, so a pipeline config is checked
without importing torch or any network; :func:`get` imports a family's module on the
first lookup, and the module registers its class with the :func:`register` class
decorator. A family module that fails to import is an error at lookup, not a silently
missing family. A family outside :data:`BUILTINS` (a test's, a plug-in's) registers its
class directly and joins :func:`names` and the union from then on.

:func:`config_union` turns the families' configs into one pydantic type: ``base`` (the
train stage's own fields) merged with each family's config, discriminated by ``family``
with a default, so ``train: {steps: 20}`` means ``musetalk15`` and ``train: {family:
nope}`` fails at start naming the registered families.
"""

from __future__ import annotations

import pkgutil
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args

from pydantic import BaseModel, BeforeValidator, Discriminator, Tag

from generators.family_config import FamilyConfig

if TYPE_CHECKING:
    from generators.family import ModelFamily

DEFAULT_FAMILY = "musetalk15"
# name -> ("module:ConfigClass", "module:FamilyClass")
BUILTINS: dict[str, tuple[str, str]] = {
    "musetalk15": (
        "generators.musetalk15.config:Musetalk15Config",
        "generators.musetalk15.family:Musetalk15Family",
    ),
    "musetalk2": (
        "generators.musetalk2.config:Musetalk2Config",
        "generators.musetalk2.family:Musetalk2Family",
    ),
    "dualforce": (
        "generators.dualforce.config:DualForceConfig",
        "generators.dualforce.family:DualForceFamily",
    ),
}

_FAMILIES: dict[str, type[ModelFamily]] = {}


def _path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def register(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: add a family under ``cls.name`` (its config's ``family`` tag); a
    built-in name takes only the class and config :data:`BUILTINS` names."""
    tag = cls.config_type.model_fields["family"]
    if get_args(tag.annotation) != (cls.name,) or tag.default != cls.name:
        raise TypeError(
            f"{cls.__name__}: config_type.family must be Literal[{cls.name!r}] = {cls.name!r}"
        )
    if cls.spec_type.model_fields["family"].default != cls.name:
        raise TypeError(f"{cls.__name__}: spec_type.family must default to {cls.name!r}")
    known = _FAMILIES.get(cls.name)
    builtin = BUILTINS.get(cls.name)
    owner = builtin[1] if builtin is not None else known and _path(known)
    if owner and owner != _path(cls):
        raise ValueError(f"model family {cls.name!r} is already registered by {owner}")
    if builtin is not None and cls.config_type is not pkgutil.resolve_name(builtin[0]):
        raise TypeError(f"{cls.__name__}: config_type must be {builtin[0]}")
    _FAMILIES[cls.name] = cls
    return cls


def names() -> list[str]:
    """Registered family names (built in or registered), sorted."""
    return sorted(BUILTINS.keys() | _FAMILIES.keys())


def config_type(name: str) -> type[FamilyConfig]:
    """The config class of family ``name``, without importing the family's module."""
    if name in _FAMILIES:
        return _FAMILIES[name].config_type
    if name in BUILTINS:
        return pkgutil.resolve_name(BUILTINS[name][0])
    raise KeyError(f"unknown model family {name!r}; registered: {names()}")


def get(name: str) -> type[ModelFamily]:
    """The family class registered as ``name``; ``KeyError`` naming the known ones."""
    if name in BUILTINS and name not in _FAMILIES:
        pkgutil.resolve_name(BUILTINS[name][1])  # importing the module registers the class
    try:
        return _FAMILIES[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; registered: {names()}") from None


def family_config(config: BaseModel) -> FamilyConfig:
    """The family part of a merged stage config (or a plain family config), as its own type."""
    cls = config_type(str(config.family))  # type: ignore[attr-defined]
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
        cfg = config_type(name)
        if base is not None:
            clash = (set(base.model_fields) & set(cfg.model_fields)) - {"family"}
            if clash:
                raise TypeError(f"family {name!r} config reuses stage fields {sorted(clash)}")
            cfg = type(f"{base.__name__}_{name}", (base, cfg), {"__module__": base.__module__})
        members.append(Annotated[cfg, Tag(name)])

    def known(value: Any) -> Any:
        tag = _tag(value, default)
        if tag not in BUILTINS and tag not in _FAMILIES:
            raise ValueError(f"unknown model family {tag!r}; registered: {', '.join(names())}")
        return value

    return Annotated[
        Union[tuple(members)],  # noqa: UP007 - built at runtime from the registry
        Discriminator(lambda v: _tag(v, default)),
        BeforeValidator(known),
    ]
