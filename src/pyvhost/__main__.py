"""``python -m pyvhost``: the same as the ``pyvhost`` command."""

import sys

from pyvhost.cli.main import main

sys.exit(main())
