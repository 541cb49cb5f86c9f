"""Adapters looked up by the HF architecture name; the only place that knows the families."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.models.base import ModelAdapter

_ADAPTERS: dict[str, type["ModelAdapter"]] = {}


class UnsupportedModel(ValueError):
    pass


def register(cls):
    for architecture in cls.architectures:
        _ADAPTERS[architecture] = cls
    return cls


def available_architectures() -> list[str]:
    _import_families()
    return sorted(_ADAPTERS)


def adapter_class(architecture: str) -> type["ModelAdapter"]:
    _import_families()
    try:
        return _ADAPTERS[architecture]
    except KeyError:
        raise UnsupportedModel(
            f"no adapter for architecture {architecture!r}; supported: {', '.join(sorted(_ADAPTERS))}"
        ) from None


def adapter_for(model, processor, name: str = "") -> "ModelAdapter":
    return adapter_class(type(model).__name__)(model, processor, name)


def _import_families() -> None:
    # Importing a family module registers its adapter.
    import workbench.models.families  # noqa: F401
