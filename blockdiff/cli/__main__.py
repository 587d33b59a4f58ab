"""`python -m blockdiff.cli ...` is the `blockdiff` command (also what torchrun launches)."""
import sys

from . import main

sys.exit(main())
