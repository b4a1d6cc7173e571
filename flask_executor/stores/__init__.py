"""Task stores: where stored futures' records live (``EXECUTOR_STORE``).

``'memory'`` (this process), ``'sqlite:///rel.db'`` / ``'sqlite:////abs.db'``
(every process on one machine), ``'redis://[:password@]host:port/db'``
(several machines). :func:`open_store` turns the config value into a store;
the Redis store imports ``redis`` only when it is used.

.. versionadded:: 2.0
"""

from __future__ import annotations

import os
import re

from .base import BaseStore, TaskRecord
from .memory import MemoryStore

__all__ = ["BaseStore", "MemoryStore", "TaskRecord", "open_store", "redact"]


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


def open_store(
    value: str | BaseStore | None, namespace: str, instance_path: str, setting: str
) -> BaseStore:
    """The store that ``EXECUTOR_STORE`` names. Nothing is connected yet.

    :param value: the config value (a URL, or a ready :class:`BaseStore`).
    :param namespace: keeps this executor's records apart in a shared store.
    :param instance_path: what a relative SQLite path is relative to.
    :param setting: the config key, for messages.
    :raises ValueError: the value is not a store URL.
    """
    if isinstance(value, BaseStore):
        if not value.namespace:
            value.namespace = namespace
        return value
    url = "memory" if value is None or value == "" else str(value).strip()
    if url == "memory":
        return MemoryStore(namespace)
    if url.startswith("sqlite:///"):
        from .sqlite import SQLiteStore

        path = url[len("sqlite:///"):]
        if not path or path == ":memory:":
            raise ValueError(
                f"{setting} = {url!r}: give a database file; an in-memory SQLite database"
                " is not shared between processes (use 'memory')"
            )
        if not os.path.isabs(path):
            path = os.path.join(instance_path, path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
        return SQLiteStore(path, namespace)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisStore

        store: BaseStore = RedisStore(url, namespace)
        return store
    raise ValueError(
        f"{setting} = {redact(url)!r} is not a store: use 'memory', 'sqlite:///tasks.db'"
        " (relative to the app's instance folder), 'sqlite:////absolute/tasks.db' or"
        " 'redis://host:port/db'"
    )
