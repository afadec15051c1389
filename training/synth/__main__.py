"""``python -m omnipose.training.synth``: render a synthetic dataset or video sequences."""

import sys

from omnipose.training.synth.cli import main

sys.exit(main())
