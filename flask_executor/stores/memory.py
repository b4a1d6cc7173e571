"""The memory store: records in this process only (the default, as in 1.0)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from .base import CANCEL_REQUESTED, WRITABLE, BaseStore, TaskRecord

__all__ = ["MemoryStore"]


class MemoryStore(BaseStore):
    """Records in a dict under a lock. Keys may be any hashable.

    Other processes (a second gunicorn worker) do not see these records; use
    a shared store there (``EXECUTOR_STORE``).
    """

    shared = False
    url = "memory"

    def __init__(self, namespace: str = "") -> None:
        super().__init__(namespace)
        self._lock = threading.RLock()
        #: key -> task_id, oldest submitted first.
        self._keys: OrderedDict[Hashable, str] = OrderedDict()
        self._records: dict[str, TaskRecord] = {}
        self._beats: dict[tuple[str, int], float] = {}

    def _expire(self) -> None:
        if self.ttl is None:
            return
        now = time.time()
        for key, task_id in list(self._keys.items()):
            record = self._records.get(task_id)
            if record is None or self._expired(record, now):
                del self._keys[key]
                self._records.pop(task_id, None)

    def add(self, record: TaskRecord) -> bool:
        with self._lock:
            self._expire()
            if record.key in self._keys:
                return False
            self._keys[record.key] = record.task_id
            self._records[record.task_id] = record
            if self.max_length is not None:
                while len(self._keys) > self.max_length:
                    _, old = self._keys.popitem(last=False)
                    self._records.pop(old, None)
            return True

    def update(self, task_id: str, **fields: Any) -> bool:
        unknown = set(fields) - WRITABLE
        if unknown:
            raise TypeError(f"not writable: {sorted(unknown)}")
        with self._lock:
            record = self._records.get(task_id)
            if record is None or record.done:
                return False
            meta = fields.pop("meta", None)
            if meta:
                fields["meta"] = {**record.meta, **meta}
            self._records[task_id] = record.replace(**fields)
            return True

    def remove(self, task_id: str) -> None:
        with self._lock:
            record = self._records.pop(task_id, None)
            if record is not None and self._keys.get(record.key) == task_id:
                del self._keys[record.key]

    def get(self, key: Hashable) -> TaskRecord | None:
        with self._lock:
            self._expire()
            task_id = self._keys.get(key)
            return None if task_id is None else self._records.get(task_id)

    def get_by_id(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            return self._records.get(task_id)

    def pop(self, key: Hashable) -> TaskRecord | None:
        with self._lock:
            task_id = self._keys.pop(key, None)
            if task_id is None:
                return None
            return self._records.pop(task_id, None)

    def records(self, limit: int | None = None) -> list[TaskRecord]:
        with self._lock:
            self._expire()
            found = [self._records[task_id] for task_id in reversed(self._keys.values())]
        return found if limit is None else found[:limit]

    def keys(self) -> list[Hashable]:
        with self._lock:
            self._expire()
            return list(self._keys)

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._keys)

    def request_cancel(self, key: Hashable) -> TaskRecord | None:
        with self._lock:
            record = self.get(key)
            if record is not None and not record.done:
                self._records[record.task_id] = record.replace(cancel=CANCEL_REQUESTED)
            return record

    def cancel_requests(self, owner_host: str, owner_pid: int) -> list[str]:
        with self._lock:
            return [
                r.task_id
                for r in self._records.values()
                if r.cancel == CANCEL_REQUESTED
                and not r.done
                and (r.owner_host, r.owner_pid) == (owner_host, owner_pid)
            ]

    def purge(self) -> int:
        with self._lock:
            finished = [key for key, task_id in self._keys.items() if self._records[task_id].done]
            for key in finished:
                self._records.pop(self._keys.pop(key), None)
            return len(finished)

    def beat(self, owner_host: str, owner_pid: int) -> None:
        with self._lock:
            self._beats[owner_host, owner_pid] = time.time()

    def last_beat(self, owner_host: str, owner_pid: int) -> float | None:
        with self._lock:
            return self._beats.get((owner_host, owner_pid))
