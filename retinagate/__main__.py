"""``python -m retinagate``: the same as the ``retinagate`` command."""

import sys

from retinagate.cli import main

sys.exit(main())
