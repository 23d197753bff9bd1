"""``python -m jtricks.cli``: the ``jtricks`` command."""

import sys

from jtricks.cli import main

sys.exit(main())
