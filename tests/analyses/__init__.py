"""Tests of the analyses on constructed inputs whose answers are known, and on the shipped model."""
