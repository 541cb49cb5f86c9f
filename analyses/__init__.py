"""Analyses: redundancy, misalignment, method comparison and failure diagnosis over recordings."""
