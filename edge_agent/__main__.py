"""`python -m edge_agent run|simulate ...`: the edge agent's commands (the same as `raffm agent ...`)."""

import sys

from edge_agent.cli import main

sys.exit(main())
