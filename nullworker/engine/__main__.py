"""``python -m nullworker.engine`` is ``nullworker engine``."""

import sys

from .cli import main

sys.exit(main())
