"""``python -m nullworker.client`` is ``nullworker reserve``."""

import sys

from .reservation import main

sys.exit(main())
