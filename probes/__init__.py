"""Probes: record per-layer signals (attention, flow, sinks, saliency, transitions) from one traced forward."""
