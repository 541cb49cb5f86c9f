"""Pruning methods looked up by name (as inseq's attribution methods): ``available_methods()``
lists them and an unknown name fails with the list of valid ones."""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench.errors import UserError

if TYPE_CHECKING:
    from workbench.pruning.method import PruningMethod

_METHODS: dict[str, type["PruningMethod"]] = {}


class UnknownMethod(UserError, ValueError):
    pass


class InvalidMethodParameters(UserError, ValueError):
    """A hyper-parameter the method does not have, or a value it refuses."""


def register_method(name: str):
    """Class decorator: register a ``PruningMethod`` under ``name`` (also set as ``cls.name``)."""
    def add(cls):
        from workbench.pruning.method import SCORE_SOURCES

        if cls.scored_by not in SCORE_SOURCES:
            raise ValueError(f"pruning method {name!r}: scored_by {cls.scored_by!r} is not one of {SCORE_SOURCES}")
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"pruning method {name!r} is already registered by {_METHODS[name].__name__}")
        cls.name = name
        _METHODS[name] = cls
        return cls
    return add


def available_methods() -> list[str]:
    _import_methods()
    return sorted(_METHODS)


def method_class(name: str) -> type["PruningMethod"]:
    _import_methods()
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethod(f"unknown pruning method {name!r}; available: {', '.join(sorted(_METHODS))}") from None


def create_method(name: str, **params) -> "PruningMethod":
    """An instance of method ``name`` with ``params`` overriding its defaults (validated). A name
    "first+second" is a composition (``workbench.pruning.compose``)."""
    from workbench.pruning.compose import compose, is_composed  # compose builds on this module

    if is_composed(name):
        return compose(name, **params)
    cls = method_class(name)
    try:
        return cls(**params)
    except TypeError as e:  # an unknown hyper-parameter name
        raise InvalidMethodParameters(f"{name}: {e}") from None
    except ValueError as e:  # a value the method's validation refuses
        raise InvalidMethodParameters(str(e) if str(e).startswith(name) else f"{name}: {e}") from None


def _import_methods() -> None:
    # Importing a method module registers its methods.
    import workbench.pruning.baselines  # noqa: F401
    import workbench.pruning.methods  # noqa: F401
