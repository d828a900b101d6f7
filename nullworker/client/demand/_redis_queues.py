"""Redis job frameworks: each one's waiting and in-flight jobs, read from its own keys.

Every framework keeps its jobs in Redis in a layout of its own, and none of them in one
list that a worker leaves alone until the job is done: a job is taken off the waiting
list (or set) as it starts, and kept somewhere else while it runs. Counting only the
waiting jobs would let the autoscaler release a worker in the middle of a job, so
:class:`RedisQueue` counts, for each framework, the jobs waiting, those being worked
on, and the delayed or scheduled jobs that are due (a framework moves those onto its
queue from inside a running worker, so with no worker left they would never be seen).
Jobs delayed into the future are not counted.

What is counted, from the frameworks' own sources:

``celery`` (kombu ``kombu/transport/redis.py``, ``Channel``):
  waiting: the list ``<queue>`` and its priority siblings ``<queue><sep><1..9>``
  (``_q_for_pri``: the default ``priority_steps`` use 3, 6 and 9, a fine-grained setup
  any of 1..9; ``sep`` is ``\\x06\\x16`` by default and ``:`` in the setup Celery's
  docs recommend for priorities: both are read, and a sibling key that is not a list
  is left out). In flight: the entries of the hash ``unacked`` (kombu's ack emulation:
  a message a worker fetched and has not acknowledged: prefetched, or running with
  ``task_acks_late``) that route to this queue: each entry is ``[message, exchange,
  routing_key]``, and a member ``routing_key<sep>pattern<sep><queue>`` of the
  exchange's binding set ``_kombu.binding.<exchange>`` says it does (with no binding
  set, a routing key equal to the queue's name). ``prefix`` is kombu's
  ``global_keyprefix`` (none by default), put before every key.
``rq`` (``rq/queue.py``, ``rq/intermediate_queue.py``, ``rq/registry.py``):
  waiting: the list ``rq:queue:<queue>``. In flight: the started registry, the sorted
  set ``rq:wip:<queue>`` (score: when the job's lease expires; entries whose lease has
  passed belong to a dead worker and are not counted), plus the jobs in the
  intermediate list ``rq:queue:<queue>:intermediate`` whose job hash
  ``rq:job:<id>`` still says ``queued`` (taken off the queue by a worker, not yet in
  the registry). ``prefix`` replaces ``rq``.
``dramatiq`` (``dramatiq/brokers/redis.py``, ``dramatiq/brokers/redis/dispatch.lua``):
  the hash ``dramatiq:<queue>.msgs`` holds every message of the queue until it is
  acknowledged, waiting and fetched alike: its ``HLEN``. Plus the delayed messages of
  ``dramatiq:<queue>.DQ.msgs`` whose ``options.eta`` (ms) has passed (a message that
  is not JSON counts as due). ``prefix`` is the broker's ``namespace``.
``arq`` (``arq/worker.py``, ``arq/constants.py``):
  the sorted set named ``<queue>`` (``arq:queue`` by default) scored by when each job
  is due (ms); a job stays in it while it runs (``finish_job`` removes it). Demand is
  the number of jobs due now, running ones included: ``ZCOUNT <queue> -inf <now>``.
  No ``prefix``: the queue's name is its key.
``bullmq`` (``src/commands/*.lua``, ``src/classes/queue-keys.ts``):
  waiting: the list ``bull:<queue>:wait`` and the sorted set ``:prioritized``, unless
  the queue is paused (``paused`` in the hash ``:meta``: its jobs are not for taking
  then). In flight: the list ``:active``. Due: the jobs of the sorted set ``:delayed``
  whose score (``timestamp * 0x1000 + n``, ``getDelayedScore.lua``) is now or earlier.
  ``prefix`` replaces ``bull``.
``sidekiq`` (``lib/sidekiq/api.rb``, ``lib/sidekiq/launcher.rb``):
  waiting: the list ``queue:<queue>``. In flight: for each process in the set
  ``processes``, the entries of its hash ``<process>:work`` (one per busy thread, a
  JSON object whose ``queue`` is this one; the hash expires 60 s after its process's
  last heartbeat). Due: the entries of the sorted sets ``schedule`` and ``retry``
  (score: when, in seconds) for this queue. ``prefix`` is put before every key (as
  redis-namespace did).

Each read is one Lua script (``EVALSHA``, one round trip); it takes the time from the
Redis server (``TIME``), so the autoscaler's clock does not matter.
"""

from __future__ import annotations

from typing import Any, ClassVar

import redis.asyncio
import redis.commands.core
import redis.exceptions

from ...errors import DemandError
from .._redact import redact
from ._base import DEFAULT_TIMEOUT_S
from ._redis import RedisSource

#: The frameworks :class:`RedisQueue` knows, in the order the docs list them.
FRAMEWORKS = ("celery", "rq", "dramatiq", "arq", "bullmq", "sidekiq")

# Each script returns one integer, or raises an error reply. ``now_ms`` and ``now_s``
# come from the server's clock. Keys that the script derives from data (a process's
# work hash, an exchange's binding set) are not in KEYS: these scripts are for one
# Redis server, not a cluster.
_NOW = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local now_s = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: queue, unacked. ARGV: queue name, binding-set prefix. kombu joins a queue and
# its priority, and the fields of a binding, with its ``sep``: "\x06\x16" by default,
# ":" in the setup Celery's docs recommend for priorities. Both are tried; a sibling
# key that is not a list (someone else's "celery:3") is not a priority list.
_CELERY = (
    _NOW
    + """
local name, bindings = ARGV[1], ARGV[2]
local seps = {'\\6\\22', ':'}
local n = redis.call('LLEN', KEYS[1])
for _, sep in ipairs(seps) do
  for pri = 1, 9 do
    local key = KEYS[1] .. sep .. pri
    if redis.call('TYPE', key).ok == 'list' then
      n = n + redis.call('LLEN', key)
    end
  end
end
local function binds(member, rk)
  for _, sep in ipairs(seps) do
    local head, tail = rk .. sep, sep .. name
    if #member >= #head + #tail and string.sub(member, 1, #head) == head
        and string.sub(member, -#tail) == tail then
      return true
    end
  end
  return false
end
local members_of, routed = {}, {}
local function to_this_queue(exchange, rk)
  local key = exchange .. '\\0' .. rk
  if routed[key] == nil then
    local members = members_of[exchange]
    if members == nil then
      members = redis.call('SMEMBERS', bindings .. exchange)
      members_of[exchange] = members
    end
    local found = #members == 0 and rk == name
    for _, member in ipairs(members) do
      if binds(member, rk) then found = true end
    end
    routed[key] = found
  end
  return routed[key]
end
for _, raw in ipairs(redis.call('HVALS', KEYS[2])) do
  local ok, entry = pcall(cjson.decode, raw)
  if ok and type(entry) == 'table' and type(entry[2]) == 'string'
      and type(entry[3]) == 'string' and to_this_queue(entry[2], entry[3]) then
    n = n + 1
  end
end
return n
"""
)

# KEYS: queue, intermediate, started registry. ARGV: job hash prefix.
_RQ = (
    _NOW
    + """
local n = redis.call('LLEN', KEYS[1])
n = n + redis.call('ZCOUNT', KEYS[3], '(' .. now_s, '+inf')
for _, id in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  if redis.call('HGET', ARGV[1] .. id, 'status') == 'queued' then n = n + 1 end
end
return n
"""
)

# KEYS: messages, delayed messages.
_DRAMATIQ = (
    _NOW
    + """
local n = redis.call('HLEN', KEYS[1])
for _, raw in ipairs(redis.call('HVALS', KEYS[2])) do
  local ok, message = pcall(cjson.decode, raw)
  local eta = nil
  if ok and type(message) == 'table' and type(message.options) == 'table' then
    eta = tonumber(message.options.eta)
  end
  if eta == nil or eta <= now_ms then n = n + 1 end
end
return n
"""
)

# KEYS: the queue's sorted set.
_ARQ = (
    _NOW
    + """
return redis.call('ZCOUNT', KEYS[1], '-inf', now_ms)
"""
)

# KEYS: wait, prioritized, active, delayed, meta.
_BULLMQ = (
    _NOW
    + """
local n = redis.call('LLEN', KEYS[3])
if redis.call('HEXISTS', KEYS[5], 'paused') == 0 then
  n = n + redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
  n = n + redis.call('ZCOUNT', KEYS[4], 0, (now_ms + 1) * 0x1000 - 1)
end
return n
"""
)

# KEYS: queue, processes, schedule, retry. ARGV: queue name, key prefix.
_SIDEKIQ = (
    _NOW
    + """
local name, prefix = ARGV[1], ARGV[2]
local function for_this_queue(raw)
  local ok, job = pcall(cjson.decode, raw)
  return ok and type(job) == 'table' and job.queue == name
end
local n = redis.call('LLEN', KEYS[1])
for _, process in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  for _, raw in ipairs(redis.call('HVALS', prefix .. process .. ':work')) do
    if for_this_queue(raw) then n = n + 1 end
  end
end
for i = 3, 4 do
  for _, raw in ipairs(redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', now_s)) do
    if for_this_queue(raw) then n = n + 1 end
  end
end
return n
"""
)

_SCRIPTS = {
    "celery": _CELERY,
    "rq": _RQ,
    "dramatiq": _DRAMATIQ,
    "arq": _ARQ,
    "bullmq": _BULLMQ,
    "sidekiq": _SIDEKIQ,
}

_DEFAULT_PREFIX = {
    "celery": "",
    "rq": "rq",
    "dramatiq": "dramatiq",
    "arq": "",
    "bullmq": "bull",
    "sidekiq": "",
}


def _keys_and_args(framework: str, queue: str, prefix: str) -> tuple[list[str], list[str]]:
    if framework == "celery":
        return [prefix + queue, prefix + "unacked"], [queue, prefix + "_kombu.binding."]
    if framework == "rq":
        key = f"{prefix}:queue:{queue}"
        return [key, f"{key}:intermediate", f"{prefix}:wip:{queue}"], [f"{prefix}:job:"]
    if framework == "dramatiq":
        return [f"{prefix}:{queue}.msgs", f"{prefix}:{queue}.DQ.msgs"], []
    if framework == "arq":
        return [queue], []
    if framework == "bullmq":
        base = f"{prefix}:{queue}:"
        return [base + part for part in ("wait", "prioritized", "active", "delayed", "meta")], []
    # sidekiq
    return [
        f"{prefix}queue:{queue}",
        f"{prefix}processes",
        f"{prefix}schedule",
        f"{prefix}retry",
    ], [queue, prefix]


class RedisQueue(RedisSource):
    """The waiting, in-flight and due jobs of one queue of a Redis job framework.

    ``framework`` is one of :data:`FRAMEWORKS`; what each counts, and from which keys
    of the framework's own layout, is in this module's docstring. One read is one Lua
    script run on the server (one round trip). Missing keys count as empty, as in
    Redis: a queue nobody has used yet reads 0. A key of the wrong type is a
    :class:`DemandError` (the script's error, e.g. ``WRONGTYPE``).

    Args:
      url: ``redis://…`` as for :class:`RedisList`.
      framework: ``celery``, ``rq``, ``dramatiq``, ``arq``, ``bullmq`` or ``sidekiq``.
      queue: the queue's name (for arq, its key: ``arq:queue`` by default).
      prefix: the framework's key prefix, if not its default: kombu's
        ``global_keyprefix`` (celery, default none), the rq prefix (``rq``), dramatiq's
        ``namespace`` (``dramatiq``), BullMQ's ``prefix`` (``bull``), a namespace put
        before every Sidekiq key (none). arq takes none.
      timeout_s: bound on one read.
    """

    _scripts: ClassVar[dict[str, str]] = _SCRIPTS

    def __init__(
        self,
        url: str,
        framework: str,
        queue: str,
        *,
        prefix: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if framework not in FRAMEWORKS:
            raise ValueError(f"unknown job framework {framework!r}: one of {', '.join(FRAMEWORKS)}")
        if not queue:
            raise ValueError(f"RedisQueue needs a {framework} queue name")
        if prefix is not None and framework == "arq":
            raise ValueError("arq has no key prefix: give the queue's key as the queue name")
        if prefix is not None and framework in ("rq", "dramatiq", "bullmq") and not prefix:
            raise ValueError(f"the {framework} key prefix must not be empty")
        super().__init__(url, timeout_s=timeout_s)
        self.framework = framework
        self.queue = queue
        self.prefix = _DEFAULT_PREFIX[framework] if prefix is None else prefix
        self._keys, self._args = _keys_and_args(framework, queue, self.prefix)
        self._script: redis.commands.core.AsyncScript | None = None
        self._script_client: redis.asyncio.Redis | None = None

    def describe(self) -> str:
        prefix = self.prefix
        prefix = "" if prefix == _DEFAULT_PREFIX[self.framework] else f" prefix {prefix!r}"
        return f"{self.framework} queue {self.queue!r}{prefix} at {redact(self.url)}"

    async def _aio_query(self, client: redis.asyncio.Redis) -> int:
        if self._script is None or self._script_client is not client:
            # EVALSHA, falling back to EVAL once per connection (a restarted server
            # has lost its script cache).
            self._script = client.register_script(self._scripts[self.framework])
            self._script_client = client
        try:
            value: Any = await self._script(keys=self._keys, args=self._args)
        except redis.exceptions.ResponseError as exc:
            # WRONGTYPE, a script error: the server answered, the connection is fine.
            raise self._answer_error(exc) from exc
        if isinstance(value, bool) or not isinstance(value, int):
            raise DemandError(f"{self.describe()}: the script returned {value!r}, not a count")
        return value
