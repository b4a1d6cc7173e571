"""Bad objects and task functions for ``test_faults`` and ``test_reliability``.

Everything is defined at module level so that it pickles *by reference*: a worker
imports this module and rebuilds the object there, which is where the fault is meant to
happen (in the spirit of CPython's ``test_concurrent_futures/test_deadlock.py`` and
loky's crash tests). The bad objects fail in one direction only:

- ``ErrorAtPickle``: ``__reduce__`` raises, in whichever process pickles it;
- ``ErrorAtUnpickle`` / ``ExitAtUnpickle`` / ``CrashAtUnpickle`` /
  ``SysExitAtUnpickle``: pickle fine, fail in the process that *unpickles* them;
- ``ExitAtPickle`` / ``CrashAtPickle``: end the process that pickles them; they are
  only ever created inside a worker (by ``return_instance``), so the test process never
  pickles one.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from support import TIMEOUT, touch, wait_for_path


class FaultError(Exception):
    """The error the bad objects and tasks raise on purpose."""


class TwoArgError(Exception):
    """Cannot be rebuilt by unpickling: ``args`` holds one value, ``__init__`` needs two."""

    def __init__(self, a: Any, b: Any) -> None:
        super().__init__("two-arg error message")
        self.a = a
        self.b = b

    def __reduce__(self) -> tuple[Any, ...]:
        # What BaseException's own reduction gives, as the class's own: tblib's
        # exception pickling (installed by importing distributed, and inherited
        # by fork workers) rebuilds an exception without calling __init__ only
        # when its class keeps the builtin reduction.
        return type(self), self.args


class LockError(Exception):
    """Cannot be pickled at all: it holds a lock."""

    def __init__(self) -> None:
        super().__init__("an error holding a lock")
        self.lock = threading.Lock()


# -- what the bad objects' reducers call ------------------------------------------------


def raise_fault(where: str) -> None:
    raise FaultError(f"fault raised at {where}")


def exit_now(code: int) -> None:
    os._exit(code)


def sys_exit(code: int) -> None:
    sys.exit(code)


def kill_self(signum: int) -> None:
    # pytest's faulthandler, inherited by forked workers, would print a SIGSEGV report.
    faulthandler.disable()
    os.kill(os.getpid(), signum)
    time.sleep(TIMEOUT)  # the signal is delivered before this returns


def null_deref() -> None:
    faulthandler.disable()  # a real segfault, without the fatal-error report
    ctypes.string_at(0)


# -- bad objects -------------------------------------------------------------------------


class ErrorAtPickle:
    def __reduce__(self) -> Any:
        raise FaultError("fault raised at pickle")


class ErrorAtUnpickle:
    def __reduce__(self) -> Any:
        return raise_fault, ("unpickle",)


class ExitAtUnpickle:
    def __reduce__(self) -> Any:
        return exit_now, (1,)


class SysExitAtUnpickle:
    def __reduce__(self) -> Any:
        return sys_exit, (5,)


class CrashAtUnpickle:
    def __reduce__(self) -> Any:
        return kill_self, (int(signal.SIGSEGV),)


class ExitAtPickle:
    def __reduce__(self) -> Any:
        exit_now(4)
        raise AssertionError("unreachable")


class SysExitAtPickle:
    def __reduce__(self) -> Any:
        sys.exit(7)


class CrashAtPickle:
    def __reduce__(self) -> Any:
        kill_self(int(signal.SIGKILL))
        raise AssertionError("unreachable")


# -- tasks -------------------------------------------------------------------------------


def identity(value: Any) -> Any:
    return value


def square(value: int) -> int:
    return value * value


def return_instance(cls: type[Any]) -> Any:
    """Task: build a ``cls`` in the worker and return it (its pickling is the fault)."""
    return cls()


def return_lock() -> Any:
    return threading.Lock()


def raise_two_arg_error() -> None:
    raise TwoArgError(1, 2)


def raise_lock_error() -> None:
    raise LockError()


def getpid() -> int:
    return os.getpid()


def write_pid(path: str) -> None:
    """Write this process's pid to ``path`` atomically (readers never see a partial file)."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(str(os.getpid()), encoding="utf-8")
    os.replace(tmp, path)


def read_pid(path: str, timeout: float = TIMEOUT) -> int:
    wait_for_path(path, timeout)
    return int(Path(path).read_text(encoding="utf-8"))


def pid_then_sleep(path: str, seconds: float) -> int:
    """Task: report the worker's pid through ``path``, then sleep (to be killed)."""
    write_pid(path)
    time.sleep(seconds)
    return os.getpid()


def pid_then_block(path: str, gate: str) -> int:
    """Task: report the worker's pid through ``path``, then wait for the ``gate`` file."""
    write_pid(path)
    wait_for_path(gate)
    return os.getpid()


def rendezvous(directory: str, name: str, count: int) -> int:
    """Task: mark arrival in ``directory`` and wait until ``count`` tasks arrived.

    ``count`` of these can only all return if ``count`` workers run at the same time;
    returns the worker's pid.
    """
    touch(os.path.join(directory, name))
    deadline = time.monotonic() + TIMEOUT
    while len(os.listdir(directory)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(os.listdir(directory))} of {count} arrived")
        time.sleep(0.005)
    return os.getpid()


def pid_is_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def describe_file(storage: Any) -> dict[str, Any]:
    """Task: what arrived of a werkzeug ``FileStorage`` argument."""
    from werkzeug.datastructures import FileStorage

    return {
        "is_filestorage": isinstance(storage, FileStorage),
        "filename": storage.filename,
        "content_type": storage.content_type,
        "data": storage.read(),
    }


def describe_file_after(gate: str, storage: Any) -> dict[str, Any]:
    """Task: wait for ``gate`` (the request has ended by then), then read the file."""
    wait_for_path(gate)
    return describe_file(storage)


def whoami(thread: int, index: int) -> tuple[int, int, str, str]:
    """Task: the context it runs in (``g.user`` and ``?u=``), next to its arguments."""
    from flask import g, request

    return thread, index, g.user, request.args["u"]


def write_after(path: str, delay: float) -> str:
    """Task: sleep ``delay`` seconds, then write ``path``."""
    time.sleep(delay)
    Path(path).write_text("done", encoding="utf-8")
    return path
