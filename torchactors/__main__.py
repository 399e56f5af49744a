"""``python -m torchactors``: the ``torchactors`` command (torchactors/jobs/cli.py)."""

import sys

from torchactors.jobs.cli import main

sys.exit(main())
