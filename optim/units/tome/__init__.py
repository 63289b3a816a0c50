"""Token merging (ToMe for SD): similar tokens merged before self-attention and split after it.

`config.py` holds the settings (plain data, no torch), `merge.py` the matching, `unit.py` the behaviour.
"""

from __future__ import annotations

from .. import public_apply
from .config import ToMeConfig

apply_tome = public_apply(ToMeConfig, 'ToMeConfig(ratio=0.5)')

__all__ = ["ToMeConfig", "apply_tome"]
