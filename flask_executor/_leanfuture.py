"""A lean :class:`concurrent.futures.Future`: what a future costs the cyclic
garbage collector while it waits in a queue, and once it is done.

A stdlib Future is 11 objects for the collector on Python 3.11: its
``Condition`` (which binds five of its lock's methods to itself), the RLock,
the condition's deque and two lists. A caller with a backlog of 20,000
tasks, or that keeps 20,000 finished futures, makes the collector's full
passes walk all of them, and they dominated a thread-mode batch (issue 13).
:class:`LeanFuture` makes the condition and the lists on first use (a queued
task has not used them yet) and its condition reaches the lock's methods
through its class: 1 object while queued, 6 once done.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures._base import PENDING
from typing import Any, Generic, TypeVar

__all__ = ["LeanFuture"]

T = TypeVar("T")


class LeanFuture(Future[T], Generic[T]):
    """A :class:`~concurrent.futures.Future` whose ``_condition``,
    ``_waiters`` and ``_done_callbacks`` (the attributes the standard
    library's methods use) are made when first used. ``dict.setdefault`` is
    atomic, so two threads that use a new future at once get the same ones."""

    # No __slots__: Future instances have a __dict__ anyway, and a slot added
    # on top of it makes Python 3.13 keep that __dict__ as a separate dict,
    # tracked by the garbage collector once it holds a container (the
    # subclass's ``_meta``): one more object per pending task. Without slots
    # the attributes live inline in the instance.

    def __init__(self) -> None:
        # Future.__init__ minus what is made on first use.
        self._made: dict[str, Any] = {}  # empty: not tracked by the garbage collector
        self._state = PENDING
        self._result: T | None = None
        self._exception: BaseException | None = None

    @property
    def _condition(self) -> threading.Condition:  # type: ignore[override]
        made = self._made
        condition = made.get("condition")
        if condition is None:
            condition = made.setdefault("condition", _Condition())
        return condition  # type: ignore[no-any-return]

    @property
    def _waiters(self) -> list[Any]:  # type: ignore[override]
        made = self._made
        waiters = made.get("waiters")
        if waiters is None:
            waiters = made.setdefault("waiters", [])
        return waiters  # type: ignore[no-any-return]

    @property
    def _done_callbacks(self) -> list[Callable[[Future[T]], object]]:
        made = self._made
        callbacks = made.get("callbacks")
        if callbacks is None:
            callbacks = made.setdefault("callbacks", [])
        return callbacks  # type: ignore[no-any-return]

    def _callbacks_added(self) -> list[Callable[[Future[T]], object]] | tuple[()]:
        """The callbacks added so far, without making the list."""
        return self._made.get("callbacks", ())  # type: ignore[no-any-return]

    def _drop_callbacks(self) -> None:
        self._made.pop("callbacks", None)


class _Condition(threading.Condition):
    """A :class:`threading.Condition` over its own RLock that reaches the
    lock's methods through its class instead of binding five of them to each
    instance: 3 objects for the garbage collector per future instead of 8
    (a caller that keeps 20,000 finished futures keeps 100,000 fewer)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._waiters: collections.deque[Any] = collections.deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def _release_save(self) -> Any:
        return self._lock._release_save()  # type: ignore[attr-defined]

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)  # type: ignore[attr-defined]

    def _is_owned(self) -> bool:
        return self._lock._is_owned()  # type: ignore[attr-defined,no-any-return]
