"""`python -m kiln ...` is the `kiln` command (what torchrun runs: `torchrun ... -m kiln train`)."""

import sys

from kiln.cli import main

sys.exit(main())
