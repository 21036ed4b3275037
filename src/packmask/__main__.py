"""``python -m packmask ...`` is the ``packmask`` command (see :mod:`packmask.cli`)."""
import faulthandler
import os
import sys

from packmask.cli import main
from packmask.cli.errors import EXIT_SIGINT, EXIT_SIGTERM

faulthandler.enable()  # a crash in native code (Arrow, numba) prints where, instead of a silent signal exit
status = main()
if status in (EXIT_SIGINT, EXIT_SIGTERM):
    # stopped by Ctrl-C / SIGTERM: the command's cleanup has run (staged outputs removed, targets untouched)
    # and said so; leave without interpreter finalization, where native thread pools left mid-work by the
    # interrupted write (Arrow's) can crash the process after the fact
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
sys.exit(status)
