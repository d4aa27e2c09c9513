"""`python -m raffm_app ...`: the `raffm` command (what the demo and the tests start as child processes)."""

import sys

from raffm_app.cli import main

sys.exit(main())
