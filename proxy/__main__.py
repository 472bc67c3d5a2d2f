"""``python -m proxy`` is the ``signing-proxy`` command."""

import sys

from .cli import main

sys.exit(main())
