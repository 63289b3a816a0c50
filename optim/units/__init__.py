"""Built-in optimization units; importing this package registers them (class definitions only)."""

from . import channels_last, precision  # noqa: F401
