"""Workbench: see why visual-token pruning methods keep the tokens they keep, and why they fail."""
