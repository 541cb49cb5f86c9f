"""Imports every family module so that each registers its adapter."""

from workbench.models import idefics3, llava, llava_next, llava_onevision, qwen2_vl  # noqa: F401
