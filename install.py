"""A1111 runs this once when the extension is installed: install what the engine needs."""

from pathlib import Path

import launch  # provided by the A1111 WebUI

_REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"

for line in _REQUIREMENTS.read_text(encoding="utf-8").splitlines():
    requirement = line.split("#", 1)[0].strip()
    if not requirement:
        continue
    name = requirement.split(">=")[0].split("==")[0].strip()
    if not launch.is_installed(name.replace("-", "_")):
        launch.run_pip(f"install \"{requirement}\"", f"SDAccel requirement: {requirement}")
