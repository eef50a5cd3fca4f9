"""`python -m lensflow` is the `lensflow` command."""

import sys

from lensflow.cli import main

sys.exit(main())
