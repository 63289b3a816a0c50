"""Random-weight models in the real layouts, and checkpoint writers, for tests and benchmarks.

The engine never imports this package; `enable_synthetic()` lets `synthetic:<family>` model paths load.
"""

from .random_weights import build_components, build_pipeline, write_checkpoint, write_single_file
from .synthetic import enable_synthetic

__all__ = ["build_components", "build_pipeline", "enable_synthetic", "write_checkpoint", "write_single_file"]
