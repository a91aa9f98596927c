"""``python -m skpool.cli``: the ``skpool`` command line."""

import sys

from . import main

sys.exit(main())
