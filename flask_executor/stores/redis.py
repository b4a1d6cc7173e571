"""The Redis store: records in a Redis server that several machines share.

Each record is a hash (its meta a second hash, one JSON value per field); the
key -> task_id index, the submission order and the finish times are one hash
and two sorted sets per namespace. Everything that must be atomic (claiming a
key with ``HSETNX`` plus eviction, updating only unfinished records, popping)
is a Lua script, which Redis runs without interleaving other commands.
Heartbeats are keys with an expiry. Requires the ``redis`` package
(``pip install 'flask-executor[redis]'``).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import redis

from ..errors import StoreUnavailableError
from . import redact
from .base import CANCEL_REQUESTED, UNFINISHED, WRITABLE, BaseStore, TaskRecord

__all__ = ["RedisStore"]

#: Seconds a popped record that is still running stays readable by id.
POPPED_KEEP = 86400
#: Seconds a heartbeat key lives (readers judge its age, not its presence).
BEAT_KEEP = 600

_ADD = """
local keys, order, finished, seq = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local key, id, max, cutoff, rp, mp = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6]
local function drop(k)
  local old = redis.call('HGET', keys, k)
  redis.call('HDEL', keys, k)
  redis.call('ZREM', order, k)
  redis.call('ZREM', finished, k)
  if old then redis.call('DEL', rp .. old, mp .. old) end
end
if cutoff ~= '' then
  for _, k in ipairs(redis.call('ZRANGEBYSCORE', finished, '-inf', cutoff)) do drop(k) end
end
if redis.call('HSETNX', keys, key, id) == 0 then return 0 end
redis.call('ZADD', order, redis.call('INCR', seq), key)
redis.call('HSET', rp .. id, unpack(ARGV, 7))
if max >= 0 then
  local n = redis.call('ZCARD', order)
  while n > max do
    drop(redis.call('ZRANGE', order, 0, 0)[1])
    n = n - 1
  end
end
return 1
"""

_UPDATE = """
local rec, meta, keys, finished = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local state = redis.call('HGET', rec, 'state')
if state ~= 'pending' and state ~= 'running' then return 0 end
local n = tonumber(ARGV[1])
if n > 0 then redis.call('HSET', rec, unpack(ARGV, 3, 2 + 2 * n)) end
if #ARGV > 2 + 2 * n then redis.call('HSET', meta, unpack(ARGV, 3 + 2 * n)) end
local done_at = redis.call('HGET', rec, 'finished_at')
if done_at then
  local key = redis.call('HGET', rec, 'key')
  if key and redis.call('HGET', keys, key) == ARGV[2] then
    redis.call('ZADD', finished, done_at, key)
  else
    redis.call('EXPIRE', rec, 300)
    redis.call('EXPIRE', meta, 300)
  end
end
return 1
"""

_POP = """
local keys, order, finished = KEYS[1], KEYS[2], KEYS[3]
local key, rp, mp, keep = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local id = redis.call('HGET', keys, key)
if not id then return false end
redis.call('HDEL', keys, key)
redis.call('ZREM', order, key)
redis.call('ZREM', finished, key)
local rec = redis.call('HGETALL', rp .. id)
local meta = redis.call('HGETALL', mp .. id)
local state = redis.call('HGET', rp .. id, 'state')
if state == 'pending' or state == 'running' then
  redis.call('HDEL', rp .. id, 'key')
  redis.call('EXPIRE', rp .. id, keep)
  redis.call('EXPIRE', mp .. id, keep)
else
  redis.call('DEL', rp .. id, mp .. id)
end
return {rec, meta}
"""

_GET = """
local id = redis.call('HGET', KEYS[1], ARGV[1])
if not id then return false end
return {redis.call('HGETALL', ARGV[2] .. id), redis.call('HGETALL', ARGV[3] .. id)}
"""

_REMOVE = """
local rec, meta, keys, order = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local key = redis.call('HGET', rec, 'key')
if key and redis.call('HGET', keys, key) == ARGV[1] then
  redis.call('HDEL', keys, key)
  redis.call('ZREM', order, key)
end
redis.call('DEL', rec, meta)
return 1
"""

_PURGE = """
local keys, order, finished, rp, mp = KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2]
local removed = 0
for _, key in ipairs(redis.call('ZRANGE', order, 0, -1)) do
  local id = redis.call('HGET', keys, key)
  local state = id and redis.call('HGET', rp .. id, 'state')
  if state ~= 'pending' and state ~= 'running' then
    redis.call('HDEL', keys, key)
    redis.call('ZREM', order, key)
    redis.call('ZREM', finished, key)
    if id then redis.call('DEL', rp .. id, mp .. id) end
    removed = removed + 1
  end
end
return removed
"""

_TEXT = ("key", "task_id", "function", "state", "error_type", "error_message", "traceback",
         "owner_host")
_FLOAT = ("submitted_at", "started_at", "finished_at")

F = TypeVar("F", bound=Callable[..., Any])


def _loud(method: F) -> F:
    """Turn redis-py's errors into :exc:`StoreUnavailableError` naming the URL."""

    @functools.wraps(method)
    def wrapper(self: RedisStore, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as error:
            raise StoreUnavailableError(
                f"task store {self.url!r}: {type(error).__name__}: {error}"
            ) from error

    return wrapper  # type: ignore[return-value]


def _pairs(flat: list[bytes]) -> dict[str, bytes]:
    return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}


class RedisStore(BaseStore):
    """Records in the Redis server at ``url`` (``redis://[:password@]host:port/db``)."""

    def __init__(self, url: str, namespace: str = "", timeout: float = 5.0) -> None:
        super().__init__(namespace)
        self.url = redact(url)
        self._client: Any = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._scripts = {
            name: self._client.register_script(source)
            for name, source in (("add", _ADD), ("update", _UPDATE), ("pop", _POP),
                                 ("get", _GET), ("remove", _REMOVE), ("purge", _PURGE))
        }

    # -- names -----------------------------------------------------------------

    @property
    def _prefix(self) -> str:
        return f"flask_executor:{self.namespace}:"

    def _names(self) -> list[str]:
        p = self._prefix
        return [p + "keys", p + "order", p + "finished", p + "seq"]

    def _rec(self, task_id: str) -> str:
        return f"{self._prefix}t:{task_id}"

    def _meta(self, task_id: str) -> str:
        return f"{self._prefix}m:{task_id}"

    def _cutoff(self) -> float | None:
        return None if self.ttl is None else time.time() - self.ttl

    def _record(self, flat: list[bytes], meta: list[bytes]) -> TaskRecord | None:
        raw = _pairs(flat)
        if "task_id" not in raw:
            return None
        fields: dict[str, Any] = {name: raw[name].decode() for name in _TEXT if name in raw}
        fields.setdefault("key", None)
        fields.update({name: float(raw[name]) for name in _FLOAT if name in raw})
        fields["owner_pid"] = int(raw.get("owner_pid", b"0"))
        fields["cancel"] = int(raw.get("cancel", b"0"))
        fields["outcome"] = raw.get("outcome")
        fields["meta"] = {name: json.loads(value) for name, value in _pairs(meta).items()}
        record = TaskRecord(**fields)
        return None if record.key is not None and self._expired(record) else record

    @staticmethod
    def _flat(fields: dict[str, Any]) -> list[Any]:
        flat: list[Any] = []
        for name, value in fields.items():
            if value is not None:
                flat += [name, value]
        return flat

    # -- writes ------------------------------------------------------------------

    @_loud
    def add(self, record: TaskRecord) -> bool:
        fields = {
            "key": record.key, "task_id": record.task_id, "function": record.function,
            "state": record.state, "submitted_at": repr(record.submitted_at),
            "owner_host": record.owner_host, "owner_pid": record.owner_pid,
            "cancel": record.cancel,
        }
        cutoff = self._cutoff()
        added = self._scripts["add"](
            keys=self._names(),
            args=[str(record.key), record.task_id,
                  -1 if self.max_length is None else self.max_length,
                  "" if cutoff is None else repr(cutoff),
                  self._rec(""), self._meta(""), *self._flat(fields)],
        )
        return bool(added)

    @_loud
    def update(self, task_id: str, **fields: Any) -> bool:
        unknown = set(fields) - WRITABLE
        if unknown:
            raise TypeError(f"not writable: {sorted(unknown)}")
        meta = fields.pop("meta", None) or {}
        for name in _FLOAT:
            if fields.get(name) is not None:
                fields[name] = repr(fields[name])
        flat = self._flat(fields)
        meta_flat: list[Any] = []
        for name, value in meta.items():
            meta_flat += [name, json.dumps(value, default=repr)]
        p = self._prefix
        return bool(self._scripts["update"](
            keys=[self._rec(task_id), self._meta(task_id), p + "keys", p + "finished"],
            args=[len(flat) // 2, task_id, *flat, *meta_flat],
        ))

    @_loud
    def remove(self, task_id: str) -> None:
        p = self._prefix
        self._scripts["remove"](
            keys=[self._rec(task_id), self._meta(task_id), p + "keys", p + "order"],
            args=[task_id],
        )

    # -- reads -------------------------------------------------------------------

    @_loud
    def get(self, key: Hashable) -> TaskRecord | None:
        found = self._scripts["get"](
            keys=[self._prefix + "keys"], args=[str(key), self._rec(""), self._meta("")]
        )
        return None if not found else self._record(found[0], found[1])

    @_loud
    def get_by_id(self, task_id: str) -> TaskRecord | None:
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(self._rec(task_id))
        pipe.hgetall(self._meta(task_id))
        rec, meta = pipe.execute()
        flat = [item for pair in rec.items() for item in pair]
        meta_flat = [item for pair in meta.items() for item in pair]
        record = self._record(flat, meta_flat)
        return record

    @_loud
    def pop(self, key: Hashable) -> TaskRecord | None:
        found = self._scripts["pop"](
            keys=self._names()[:3],
            args=[str(key), self._rec(""), self._meta(""), POPPED_KEEP],
        )
        if not found:
            return None
        record = self._record(found[0], found[1])
        return None if record is None else record.replace(key=key)

    @_loud
    def records(self, limit: int | None = None) -> list[TaskRecord]:
        keys = self._client.zrevrange(self._prefix + "order", 0, -1 if limit is None else limit - 1)
        found = []
        for key in keys:
            record = self.get(key.decode())
            if record is not None:
                found.append(record)
        return found

    @_loud
    def keys(self) -> list[Hashable]:
        p = self._prefix
        keys = [key.decode() for key in self._client.zrange(p + "order", 0, -1)]
        cutoff = self._cutoff()
        if cutoff is None:
            return list(keys)
        expired = {key.decode() for key in self._client.zrangebyscore(
            p + "finished", "-inf", cutoff)}
        return [key for key in keys if key not in expired]

    def __len__(self) -> int:
        return len(self.keys())

    @_loud
    def request_cancel(self, key: Hashable) -> TaskRecord | None:
        record = self.get(key)
        if record is not None and not record.done:
            pipe = self._client.pipeline()
            pipe.hset(self._rec(record.task_id), "cancel", CANCEL_REQUESTED)
            pipe.sadd(self._cancel_set(record.owner_host, record.owner_pid), record.task_id)
            pipe.execute()
        return record

    def _cancel_set(self, host: str, pid: int) -> str:
        return f"{self._prefix}cancel:{host}:{pid}"

    @_loud
    def cancel_requests(self, owner_host: str, owner_pid: int) -> list[str]:
        name = self._cancel_set(owner_host, owner_pid)
        ids = [task_id.decode() for task_id in self._client.smembers(name)]
        if not ids:
            return []
        self._client.srem(name, *ids)
        pipe = self._client.pipeline(transaction=False)
        for task_id in ids:
            pipe.hmget(self._rec(task_id), "state", "cancel")
        wanted = []
        for task_id, (state, cancel) in zip(ids, pipe.execute(), strict=True):
            if state is not None and state.decode() in UNFINISHED and int(cancel or 0) == 1:
                wanted.append(task_id)
        return wanted

    @_loud
    def purge(self) -> int:
        return int(self._scripts["purge"](
            keys=self._names()[:3], args=[self._rec(""), self._meta("")]
        ))

    # -- owners ------------------------------------------------------------------

    @_loud
    def beat(self, owner_host: str, owner_pid: int) -> None:
        self._client.set(f"flask_executor:beat:{owner_host}:{owner_pid}", repr(time.time()),
                         ex=BEAT_KEEP)

    @_loud
    def last_beat(self, owner_host: str, owner_pid: int) -> float | None:
        value = self._client.get(f"flask_executor:beat:{owner_host}:{owner_pid}")
        return None if value is None else float(value)

    def close(self) -> None:
        self._client.close()
