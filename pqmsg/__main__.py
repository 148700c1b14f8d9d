"""``python -m pqmsg`` is the ``pqmsg`` command."""

import sys

from pqmsg.cli import main

sys.exit(main())
