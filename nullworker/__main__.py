"""``python -m nullworker`` is the ``nullworker`` command."""

import sys

from .cli import main

sys.exit(main())
