"""Imports every family module so that each registers its adapter."""

from workbench.models import llava  # noqa: F401
