"""`python -m guardd` is the `guardd` command."""

import sys

from guardd.cli import main

sys.exit(main())
