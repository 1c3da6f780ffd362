"""`python -m guardd.sim` is `guardd sim`."""

import sys

from guardd.cli import main

sys.exit(main(["sim", *sys.argv[1:]]))
