"""``python -m nullworker.engine`` is ``nullworker engine``."""

import sys

from .core import main

sys.exit(main())
