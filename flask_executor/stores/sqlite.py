"""The SQLite store: one database file that every process on the machine
shares (the embedded choice for ``gunicorn -w N``).

Standard library :mod:`sqlite3` in WAL mode (readers never block the
writer), one connection per process that its threads take turns on, autocommit
with explicit ``BEGIN IMMEDIATE`` transactions where several statements must be
atomic. The
key's uniqueness is the table's unique index, so two processes adding one
key at the same moment cannot both succeed.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import StoreUnavailableError
from .base import CANCEL_REQUESTED, UNFINISHED, WRITABLE, BaseStore, TaskRecord

__all__ = ["SQLiteStore"]

#: Popped records still waited on are kept by id this long after they finish,
#: and at most this long after they were submitted.
POPPED_KEEP = 300.0
POPPED_FORGET = 86400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY,
    ns TEXT NOT NULL,
    key TEXT,
    function TEXT NOT NULL,
    state TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    error_type TEXT,
    error_message TEXT,
    traceback TEXT,
    owner_host TEXT NOT NULL,
    owner_pid INTEGER NOT NULL,
    cancel INTEGER NOT NULL DEFAULT 0,
    outcome BLOB,
    seq INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS tasks_key ON tasks (ns, key);
CREATE INDEX IF NOT EXISTS tasks_seq ON tasks (seq);
CREATE TABLE IF NOT EXISTS owners (
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    beat REAL NOT NULL,
    PRIMARY KEY (host, pid)
);
"""

_COLUMNS = (
    "key, task_id, function, state, meta, submitted_at, started_at, finished_at,"
    " error_type, error_message, traceback, owner_host, owner_pid, cancel, outcome"
)


def _record(row: tuple[Any, ...]) -> TaskRecord:
    fields = dict(zip(_COLUMNS.replace(" ", "").split(","), row, strict=True))
    fields["meta"] = json.loads(fields["meta"])
    return TaskRecord(**fields)


class SQLiteStore(BaseStore):
    """Records in the SQLite database at ``path`` (created if missing).

    :param timeout: seconds a statement waits for another process's lock.
    """

    def __init__(self, path: str, namespace: str = "", timeout: float = 10.0) -> None:
        super().__init__(namespace)
        self.path = path
        self.url = f"sqlite:///{path}"
        self.timeout = timeout
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = 0

    # -- connections -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        """This process's connection (call with the lock held)."""
        conn = self._conn
        if conn is not None and self._pid == os.getpid():
            return conn
        deadline = time.monotonic() + self.timeout
        delay = 0.005
        while True:
            try:
                conn = self._open()
                break
            except sqlite3.OperationalError as error:
                # Switching to WAL and creating the schema take locks that
                # SQLite's busy handler does not always wait for: retry.
                locked = "locked" in str(error) or "busy" in str(error)
                if not locked or time.monotonic() > deadline:
                    raise StoreUnavailableError(
                        f"cannot open the task store {self.url!r}: {error}"
                    ) from error
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
            except sqlite3.Error as error:
                raise StoreUnavailableError(
                    f"cannot open the task store {self.url!r}: {error}"
                ) from error
        # A connection inherited through fork() is never used (nor closed) here.
        self._conn, self._pid = conn, os.getpid()
        # Closed with the store if nobody calls close().
        weakref.finalize(self, conn.close)
        return conn

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
        )
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            if not conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'owners'"
            ).fetchone():
                conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connect()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.OperationalError as error:
                raise StoreUnavailableError(f"task store {self.url!r}: {error}") from error

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[list[Any], int]:
        """Run one statement: ``(rows, rowcount)``."""
        with self._lock:
            try:
                cursor = self._connect().execute(sql, params)
                return cursor.fetchall(), cursor.rowcount
            except sqlite3.OperationalError as error:
                raise StoreUnavailableError(f"task store {self.url!r}: {error}") from error

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        return self._execute(sql, params)[0]

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        rows = self._execute(sql, params)[0]
        return rows[0] if rows else None

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None and self._pid == os.getpid():
                conn.close()

    def _live(self) -> tuple[str, tuple[Any, ...]]:
        """The WHERE clause (and parameters) of records that still hold a key."""
        if self.ttl is None:
            return "ns = ? AND key IS NOT NULL", (self.namespace,)
        return (
            "ns = ? AND key IS NOT NULL AND (finished_at IS NULL OR finished_at > ?)",
            (self.namespace, time.time() - self.ttl),
        )

    # -- writes ----------------------------------------------------------------

    def add(self, record: TaskRecord) -> bool:
        now = time.time()
        try:
            with self._transaction() as conn:
                if self.ttl is not None:
                    conn.execute(
                        "DELETE FROM tasks WHERE ns = ? AND finished_at <= ?",
                        (self.namespace, now - self.ttl),
                    )
                conn.execute(  # popped records nobody waits for any more
                    "DELETE FROM tasks WHERE ns = ? AND key IS NULL"
                    " AND (finished_at <= ? OR submitted_at <= ?)",
                    (self.namespace, now - POPPED_KEEP, now - POPPED_FORGET),
                )
                try:
                    conn.execute(
                        f"INSERT INTO tasks ({_COLUMNS}, ns, seq) VALUES"
                        " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
                        " (SELECT COALESCE(MAX(seq), 0) + 1 FROM tasks))",
                        (
                            record.key, record.task_id, record.function, record.state,
                            json.dumps(record.meta, default=repr), record.submitted_at,
                            record.started_at, record.finished_at, record.error_type,
                            record.error_message, record.traceback, record.owner_host,
                            record.owner_pid, record.cancel, record.outcome, self.namespace,
                        ),
                    )
                except sqlite3.IntegrityError:
                    return False
                if self.max_length is not None:
                    conn.execute(
                        "DELETE FROM tasks WHERE ns = ? AND key IS NOT NULL AND seq <= ("
                        " SELECT seq FROM tasks WHERE ns = ? AND key IS NOT NULL"
                        " ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                        (self.namespace, self.namespace, self.max_length),
                    )
        except sqlite3.OperationalError as error:
            raise StoreUnavailableError(f"task store {self.url!r}: {error}") from error
        return True

    def update(self, task_id: str, **fields: Any) -> bool:
        unknown = set(fields) - WRITABLE
        if unknown:
            raise TypeError(f"not writable: {sorted(unknown)}")
        meta = fields.pop("meta", None)
        sets = [f"{name} = ?" for name in fields]
        params: list[Any] = list(fields.values())
        sql = f"UPDATE tasks SET {', '.join(sets)} WHERE task_id = ? AND state IN (?, ?)"
        if not meta:
            return self._execute(sql, (*params, task_id, *UNFINISHED))[1] > 0
        try:  # merge meta as dict.update does (shallow), atomically
            with self._transaction() as conn:
                row = conn.execute(
                    "SELECT meta FROM tasks WHERE task_id = ?", (task_id,)
                ).fetchone()
                if row is None:
                    return False
                merged = {**json.loads(row[0]), **meta}
                sets.append("meta = ?")
                params.append(json.dumps(merged, default=repr))
                sql = f"UPDATE tasks SET {', '.join(sets)} WHERE task_id = ? AND state IN (?, ?)"
                return conn.execute(sql, (*params, task_id, *UNFINISHED)).rowcount > 0
        except sqlite3.OperationalError as error:
            raise StoreUnavailableError(f"task store {self.url!r}: {error}") from error

    def remove(self, task_id: str) -> None:
        self._execute("DELETE FROM tasks WHERE task_id = ?", (task_id,))

    # -- reads -------------------------------------------------------------------

    def get(self, key: Hashable) -> TaskRecord | None:
        where, params = self._live()
        row = self._one(
            f"SELECT {_COLUMNS} FROM tasks WHERE {where} AND key = ?", (*params, key)
        )
        return None if row is None else _record(row)

    def get_by_id(self, task_id: str) -> TaskRecord | None:
        row = self._one(
            f"SELECT {_COLUMNS} FROM tasks WHERE task_id = ?", (task_id,)
        )
        return None if row is None else _record(row)

    def pop(self, key: Hashable) -> TaskRecord | None:
        where, params = self._live()
        try:
            with self._transaction() as conn:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM tasks WHERE {where} AND key = ?", (*params, key)
                ).fetchone()
                if row is None:
                    return None
                record = _record(row)
                if record.done:
                    conn.execute("DELETE FROM tasks WHERE task_id = ?", (record.task_id,))
                else:  # free the key; the popped future still waits by id
                    conn.execute(
                        "UPDATE tasks SET key = NULL WHERE task_id = ?", (record.task_id,)
                    )
        except sqlite3.OperationalError as error:
            raise StoreUnavailableError(f"task store {self.url!r}: {error}") from error
        return record

    def records(self, limit: int | None = None) -> list[TaskRecord]:
        where, params = self._live()
        rows = self._rows(
            f"SELECT {_COLUMNS} FROM tasks WHERE {where} ORDER BY seq DESC LIMIT ?",
            (*params, -1 if limit is None else limit),
        )
        return [_record(row) for row in rows]

    def keys(self) -> list[Hashable]:
        where, params = self._live()
        rows = self._rows(
            f"SELECT key FROM tasks WHERE {where} ORDER BY seq", params
        )
        return [row[0] for row in rows]

    def __len__(self) -> int:
        where, params = self._live()
        return int(self._one(f"SELECT COUNT(*) FROM tasks WHERE {where}", params)[0])

    def request_cancel(self, key: Hashable) -> TaskRecord | None:
        record = self.get(key)
        if record is not None and not record.done:
            self._execute(
                "UPDATE tasks SET cancel = ? WHERE task_id = ? AND state IN (?, ?)",
                (CANCEL_REQUESTED, record.task_id, *UNFINISHED),
            )
        return record

    def cancel_requests(self, owner_host: str, owner_pid: int) -> list[str]:
        rows = self._rows(
            "SELECT task_id FROM tasks WHERE ns = ? AND owner_host = ? AND owner_pid = ?"
            " AND cancel = ? AND state IN (?, ?)",
            (self.namespace, owner_host, owner_pid, CANCEL_REQUESTED, *UNFINISHED),
        )
        return [row[0] for row in rows]

    def purge(self) -> int:
        return self._execute(
            "DELETE FROM tasks WHERE ns = ? AND state NOT IN (?, ?)",
            (self.namespace, *UNFINISHED),
        )[1]

    # -- owners ------------------------------------------------------------------

    def beat(self, owner_host: str, owner_pid: int) -> None:
        self._execute(
            "INSERT INTO owners (host, pid, beat) VALUES (?, ?, ?)"
            " ON CONFLICT (host, pid) DO UPDATE SET beat = excluded.beat",
            (owner_host, owner_pid, time.time()),
        )

    def last_beat(self, owner_host: str, owner_pid: int) -> float | None:
        row = self._one(
            "SELECT beat FROM owners WHERE host = ? AND pid = ?", (owner_host, owner_pid)
        )
        return None if row is None else float(row[0])
