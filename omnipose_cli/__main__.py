"""``python -m omnipose_cli``: the same as the ``omnipose`` command."""

import sys

from omnipose_cli.main import main

sys.exit(main())
