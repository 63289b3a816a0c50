"""`python -m sdaccel`: the command-line front-end (see optim/cli.py)."""

import sys

from .optim.cli import main

sys.exit(main())
