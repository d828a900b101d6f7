"""The optional dependencies of the client side, and the message when one is missing.

The worker on the instance never imports a queue client, so ``pip install nullworker``
does not install them: the demand sources and the lease of ``nullworker autoscale`` need
the ``autoscale`` extra. A program that reaches one without it gets one line naming the
extra, instead of a bare ``No module named 'redis'``.
"""

from __future__ import annotations

__all__ = ["AUTOSCALE_EXTRA", "AUTOSCALE_EXTRA_MODULES", "missing_extra_message"]

AUTOSCALE_EXTRA = "autoscale"
#: Top-level modules that come with the ``autoscale`` extra (``pyproject.toml``).
AUTOSCALE_EXTRA_MODULES = frozenset(
    {"redis", "nats", "trio_asyncio", "boto3", "botocore", "asyncpg"}
)


def missing_extra_message(module: str | None) -> str:
    """The one line to show when ``module`` (from a ``ModuleNotFoundError``) is missing."""
    missing = f"no module named {module!r}" if module else "not installed"
    return (
        f"the demand sources and leases need the {AUTOSCALE_EXTRA!r} extra ({missing}): "
        f"pip install 'nullworker[{AUTOSCALE_EXTRA}]'"
    )
