"""`python -m ibsim` is the `ibsim` command (and `guardd sim`)."""

import sys

from ibsim.cli import main

sys.exit(main())
