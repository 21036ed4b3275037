"""``python -m packmask ...`` is the ``packmask`` command (see :mod:`packmask.cli`)."""
import sys

from packmask.cli import main

sys.exit(main())
