"""Benchmarks: presets, the side-by-side runner, fidelity metrics and the Winograd kernel bench."""
