"""No usage telemetry from OpenVINO or NNCF while SDAccel imports and calls them.

Both send usage events (Google Analytics) when the `openvino-telemetry` package is installed (NNCF brings it)
and the user never ran its opt-out tool: `import openvino` sends one, each conversion more. SDAccel promises to
work offline and to send nothing anywhere. Their only in-process switches are environment variables read when
they start a telemetry session: NNCF's `NNCF_CI` (read once, on import) and the generic `CI=true` (read on
import and by each conversion), set here around SDAccel's own imports and calls.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

_LOCK = threading.Lock()
_DEPTH = {"n": 0, "ci": None}


@contextmanager
def no_telemetry():
    """Around `openvino.convert_model` and NNCF calls; `CI` is restored afterwards (nesting and threads allowed)."""
    os.environ.setdefault("NNCF_CI", "1")  # NNCF swaps in its telemetry stub when imported with this set
    with _LOCK:
        if _DEPTH["n"] == 0:
            _DEPTH["ci"] = os.environ.get("CI")
            os.environ["CI"] = "true"
        _DEPTH["n"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH["n"] -= 1
            if _DEPTH["n"] == 0:
                if _DEPTH["ci"] is None:
                    os.environ.pop("CI", None)
                else:
                    os.environ["CI"] = _DEPTH["ci"]


def import_openvino():
    """`import openvino`, whose first import starts a telemetry session: under `no_telemetry` it stays declined."""
    with no_telemetry():
        import openvino

    return openvino
