"""The task store interface: what every store (memory, SQLite, Redis) offers.

A *record* (:class:`TaskRecord`) describes one stored task: its key, the
function, its state and meta, the times it was submitted, started and
finished, how it failed, and which process owns it. The owning process writes
the record; any process that uses the same store reads it. Dedup is the
store's atomic :meth:`BaseStore.add`.

Records are addressed two ways: by ``key`` (what the user chose; freed by
:meth:`~BaseStore.pop`) and by ``task_id`` (unique per submission; what the
owner writes through, so a popped task's late writes never land on a new task
that reuses its key).

A store knows nothing about futures, apps or pickling: results arrive as
already signed bytes (``outcome``). Write another store by subclassing
:class:`BaseStore`, in the style of Huey's ``BaseStorage``.

.. versionadded:: 2.0
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CANCEL_NONE",
    "CANCEL_REFUSED",
    "CANCEL_REQUESTED",
    "STATES",
    "UNFINISHED",
    "BaseStore",
    "TaskRecord",
]

#: Every state a record can be in (the status endpoint's names).
STATES = ("pending", "running", "finished", "failed", "cancelled")
#: States the owner may still move on from.
UNFINISHED = ("pending", "running")

#: ``TaskRecord.cancel``: nobody asked; another process asked; the owner could not.
CANCEL_NONE, CANCEL_REQUESTED, CANCEL_REFUSED = 0, 1, 2


@dataclass
class TaskRecord:
    """One stored task, as every process sees it.

    Times are wall-clock seconds (:func:`time.time`), so they compare across
    processes and machines.
    """

    #: The user's key (any hashable in the memory store; a ``str`` in a shared one).
    key: Hashable
    #: Unique per submission.
    task_id: str
    #: ``module.qualname`` of the task's callable.
    function: str
    #: One of :data:`STATES`.
    state: str = "pending"
    #: What the task set with ``current_task.update()`` (plain JSON data).
    meta: dict[str, Any] = field(default_factory=dict)
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    #: ``module.QualName`` and message of the exception a failed task raised.
    error_type: str | None = None
    error_message: str | None = None
    #: The worker's traceback text of a failed task.
    traceback: str | None = None
    #: Host name and pid of the process that submitted (owns) the task.
    owner_host: str = ""
    owner_pid: int = 0
    #: :data:`CANCEL_NONE`, :data:`CANCEL_REQUESTED` or :data:`CANCEL_REFUSED`.
    cancel: int = CANCEL_NONE
    #: The signed, pickled result or exception (shared stores only).
    outcome: bytes | None = None

    @property
    def done(self) -> bool:
        return self.state not in UNFINISHED

    def replace(self, **fields: Any) -> TaskRecord:
        """A copy with ``fields`` changed (names are not checked: the store's
        :data:`WRITABLE` and the record's own fields)."""
        copy = object.__new__(TaskRecord)
        copy.__dict__.update(self.__dict__, **fields)  # 4x faster than dataclasses.replace
        return copy


#: The fields an owner writes after :meth:`BaseStore.add`.
WRITABLE = frozenset(
    {
        "state",
        "meta",
        "started_at",
        "finished_at",
        "error_type",
        "error_message",
        "traceback",
        "cancel",
        "outcome",
    }
)


class BaseStore(ABC):
    """Where stored futures' records live.

    :param namespace: keeps the records of one executor of one app apart from
        every other's in a shared store.

    ``max_length`` and ``ttl`` apply to the store as a whole (every process):
    :meth:`add` drops the oldest submitted records past ``max_length``, and
    finished records older than ``ttl`` seconds are neither returned nor kept.
    Every method is safe to call from several threads.
    """

    #: ``False``: only this process sees the records (the memory store).
    shared: bool = True

    def __init__(self, namespace: str = "") -> None:
        self.namespace = namespace
        self.max_length: int | None = None
        self.ttl: float | None = None

    #: The store's URL without its password, for messages.
    url: str = ""

    # -- writes by the owner ------------------------------------------------

    @abstractmethod
    def add(self, record: TaskRecord) -> bool:
        """Insert ``record`` unless its key is taken, atomically; then drop
        what ``max_length`` and ``ttl`` say to drop.

        :returns: ``False`` (and nothing changed) when the key is taken.
        :raises OSError: (or the store's own error) the store cannot be reached.
        """

    @abstractmethod
    def update(self, task_id: str, **fields: Any) -> bool:
        """Change fields of an *unfinished* record (a finished one is final).
        ``meta`` is merged into the record's meta.

        :returns: ``False`` when there is no such unfinished record.
        """

    @abstractmethod
    def remove(self, task_id: str) -> None:
        """Forget a record entirely (a submission that failed before it ran)."""

    # -- reads and removals, any process --------------------------------------

    @abstractmethod
    def get(self, key: Hashable) -> TaskRecord | None:
        """The record stored under ``key``, or ``None``."""

    @abstractmethod
    def get_by_id(self, task_id: str) -> TaskRecord | None:
        """The record of submission ``task_id`` (even after its key was popped),
        or ``None``."""

    @abstractmethod
    def pop(self, key: Hashable) -> TaskRecord | None:
        """Remove the record under ``key`` for every process and return it.

        An unfinished record stays readable through :meth:`get_by_id` until it
        finishes and expires, so the popped future can still wait for it.
        """

    @abstractmethod
    def records(self, limit: int | None = None) -> list[TaskRecord]:
        """The records, newest submitted first."""

    def keys(self) -> list[Hashable]:
        """The keys, oldest submitted first (the 1.0 order)."""
        return [record.key for record in reversed(self.records())]

    def __iter__(self) -> Iterator[TaskRecord]:
        """The records, newest submitted first."""
        return iter(self.records())

    def __len__(self) -> int:
        return len(self.records())

    def __contains__(self, key: object) -> bool:
        try:
            return self.get(key) is not None
        except TypeError:  # unhashable: cannot be a key
            return False

    @abstractmethod
    def request_cancel(self, key: Hashable) -> TaskRecord | None:
        """Ask the owner to cancel the unfinished task under ``key``.

        :returns: the record as it was, or ``None`` without a record.
        """

    @abstractmethod
    def cancel_requests(self, owner_host: str, owner_pid: int) -> list[str]:
        """``task_id`` of this owner's unfinished records whose cancel was
        requested."""

    @abstractmethod
    def purge(self) -> int:
        """Remove every finished, failed and cancelled record; keep pending
        and running ones. :returns: how many were removed."""

    # -- owner liveness --------------------------------------------------------

    @abstractmethod
    def beat(self, owner_host: str, owner_pid: int) -> None:
        """Record that this owner is alive now."""

    @abstractmethod
    def last_beat(self, owner_host: str, owner_pid: int) -> float | None:
        """When the owner last called :meth:`beat` (wall clock), or ``None``."""

    def close(self) -> None:  # noqa: B027 - optional: stores without connections
        """Release connections (a closed store reopens on next use)."""

    def _expired(self, record: TaskRecord, now: float | None = None) -> bool:
        """Whether ``ttl`` has dropped this finished record."""
        if self.ttl is None or record.finished_at is None:
            return False
        return record.finished_at <= (now if now is not None else time.time()) - self.ttl
