"""`python -m shuffleinfer` is the `shuffleinfer` command."""

import sys

from shuffleinfer.cli import main

sys.exit(main())
