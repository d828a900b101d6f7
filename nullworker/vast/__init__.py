"""The Vast wire format, shared by every role: the request envelope and the route signature.

* :mod:`nullworker.vast.envelope` -- parsing the ``{"auth_data", "payload", "session_id"}``
  envelope, the ``duration`` payload field, and the engine's ids (``request_idx``,
  ``reqnum``: :func:`~nullworker.vast.envelope.as_int` and the 0..2**63 - 1 range check).
* :mod:`nullworker.vast.signing` -- what the engine signs for a route and how a worker
  checks it.
* :mod:`nullworker.vast.vocabulary` -- the words on the wire as ``StrEnum`` members: how a
  reservation or a local hold ended (``released``) and a request's status at the engine
  (``Success``, ``Error``, ``Cancelled``, ...).

Sans-IO and role-free: this package imports :mod:`nullworker.errors` and nothing of the
worker, the client or the engine, so all three read the wire format the same way.
"""
