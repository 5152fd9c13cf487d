"""``python -m minisd …``: the command line (``minisd.cli``)."""

import sys

from .cli import main

sys.exit(main())
