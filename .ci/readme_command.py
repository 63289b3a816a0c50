"""Print the shell command in README.md that follows `<!-- NAME -->`, so CI runs exactly what users read."""

import re
import sys
from pathlib import Path

name = sys.argv[1]
text = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text(encoding="utf-8")
match = re.search(rf"<!-- {re.escape(name)} -->\s*```(?:bash|sh)?\n(.*?)\n```", text, re.S)
if not match:
    sys.exit(f"README.md has no command block after <!-- {name} -->")
print(match.group(1).strip())
