"""The worker's app at the import path deployments use:
``hypercorn --worker-class trio --workers 1 'nullworker.app:create_app()'``.

The app itself lives in :mod:`nullworker.worker.app`.
"""

from __future__ import annotations

from .worker.app import create_app

__all__ = ["create_app"]
