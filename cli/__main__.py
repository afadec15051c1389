"""``python -m omnipose.cli``: the same as the ``omnipose`` command."""

import sys

from omnipose.cli.main import main

sys.exit(main())
