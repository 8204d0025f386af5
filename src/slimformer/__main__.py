"""`python -m slimformer` = the `slimformer` command."""

import sys

from slimformer.cli import main

sys.exit(main())
