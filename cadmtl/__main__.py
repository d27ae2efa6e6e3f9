"""`python -m cadmtl` is the `cadmtl` command."""

import sys

from cadmtl.cli import main

sys.exit(main())
