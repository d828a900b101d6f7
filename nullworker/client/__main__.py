"""``python -m nullworker.client`` is ``nullworker reserve``."""

import sys

from .cli import main

sys.exit(main())
