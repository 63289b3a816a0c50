"""Specs are plain data: what to load, how to optimize it and what to draw. Nothing here imports torch."""

from .ensemble import EnsembleSpec
from .model_ref import ModelRef
from .pipeline import GenerationRequest, PipelineSpec

__all__ = ["EnsembleSpec", "GenerationRequest", "ModelRef", "PipelineSpec"]
