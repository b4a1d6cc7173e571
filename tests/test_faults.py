"""Fault table for process pools: bad objects at every stage of a task's trip.

One parametrised table in the manner of CPython's
``Lib/test/test_concurrent_futures/test_deadlock.py`` and loky's crash tests: a bad
object fails while being pickled or unpickled (in the web process or the worker), while
the task runs, or while its result or exception travels back. Every row asserts

- the error the task gets (type and what its message names),
- that only the bad task failed: a task submitted before it, and still running while it
  fails, completes with its own result,
- that the same pool is usable afterwards (normal tasks, and two tasks that can only
  finish if two workers run at once, i.e. a dead worker was replaced).

Start methods: the full table runs on ``forkserver``, the default start method (and the
one whose workers are forked by a helper process, not by the test process). ``fork`` and
``spawn`` run a representative subset (one row per stage: error at unpickle, crash at
unpickle, exit and SIGKILL during the call, error and crash at result pickling, error at
result unpickling, an exception that cannot be rebuilt): the failure handling is the
same code for every start method, and ``spawn`` workers take a second each to start.

Every wait has a timeout, so a hang fails the row instead of freezing the suite.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fault_support import (
    CrashAtPickle,
    CrashAtUnpickle,
    ErrorAtPickle,
    ErrorAtUnpickle,
    ExitAtPickle,
    ExitAtUnpickle,
    FaultError,
    SysExitAtPickle,
    SysExitAtUnpickle,
    exit_now,
    identity,
    kill_self,
    null_deref,
    raise_fault,
    raise_lock_error,
    raise_two_arg_error,
    rendezvous,
    return_instance,
    return_lock,
    square,
    sys_exit,
)
from flask import Flask
from support import Gates, block_until, touch, wait_for_path

from flask_executor import Executor, SerializationError, TerminatedWorkerError

MakeExecutor = Callable[..., Executor]

#: Seconds any future in this module may take (the global per-test timeout is 60 s).
WAIT = 30

FULL_TABLE_METHOD = "forkserver"
SUBSET_METHODS = ("fork", "spawn")


@dataclass(frozen=True)
class Fault:
    """One row: submit ``fn(*args, **kwargs)``; expect ``raises`` naming ``message``."""

    id: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    raises: type[BaseException] = Exception
    message: tuple[str, ...] = ()
    #: ``submit()`` itself raises (the web process cannot pickle the call).
    at_submit: bool = False
    #: Also run on the start methods in ``SUBSET_METHODS``.
    subset: bool = False


FAULTS = [
    # -- pickling the call, in the web process: submit() raises -------------------------
    Fault(
        "error-at-pickle-arg",
        identity,
        (ErrorAtPickle(),),
        raises=SerializationError,
        message=("args[0]", "fault_support.ErrorAtPickle", "fault raised at pickle"),
        at_submit=True,
    ),
    Fault(
        "error-at-pickle-kwarg",
        identity,
        kwargs={"value": ErrorAtPickle()},
        raises=SerializationError,
        message=("kwargs['value']", "fault_support.ErrorAtPickle"),
        at_submit=True,
    ),
    # (Exit at pickle in the web process is not a row: a __reduce__ that calls sys.exit
    # in the web server is not a failure a pool can or should survive.)
    # -- unpickling the call, in the worker ------------------------------------------------
    Fault(
        "error-at-unpickle",
        identity,
        (ErrorAtUnpickle(),),
        raises=SerializationError,
        message=("could not be unpickled in the worker", "FaultError", "fault raised at unpickle"),
        subset=True,
    ),
    Fault(
        "exit-at-unpickle",
        identity,
        (ExitAtUnpickle(),),
        raises=TerminatedWorkerError,
        message=("exited with code 1",),
    ),
    Fault(
        "sys-exit-at-unpickle",
        identity,
        (SysExitAtUnpickle(),),
        raises=TerminatedWorkerError,
        message=("exited with code 5",),
    ),
    Fault(
        "crash-at-unpickle",
        identity,
        (CrashAtUnpickle(),),
        raises=TerminatedWorkerError,
        message=("SIGSEGV",),
        subset=True,
    ),
    # -- during the call -----------------------------------------------------------------
    Fault(
        "error-during-call",
        raise_fault,
        ("call",),
        raises=FaultError,
        message=("fault raised at call",),
    ),
    Fault(
        # As the standard ProcessPoolExecutor: SystemExit is the task's own exception.
        "sys-exit-during-call",
        sys_exit,
        (6,),
        raises=SystemExit,
        message=("6",),
    ),
    Fault(
        "exit-during-call",
        exit_now,
        (3,),
        raises=TerminatedWorkerError,
        message=("exited with code 3",),
        subset=True,
    ),
    Fault(
        "sigkill-during-call",
        kill_self,
        (int(signal.SIGKILL),),
        raises=TerminatedWorkerError,
        message=("SIGKILL",),
        subset=True,
    ),
    Fault(
        "sigsegv-during-call",
        kill_self,
        (int(signal.SIGSEGV),),
        raises=TerminatedWorkerError,
        message=("SIGSEGV",),
    ),
    Fault(
        "null-deref-during-call",
        null_deref,
        raises=TerminatedWorkerError,
        message=("SIGSEGV",),
    ),
    # -- pickling the result, in the worker ------------------------------------------------
    Fault(
        "error-at-result-pickle",
        return_instance,
        (ErrorAtPickle,),
        raises=SerializationError,
        message=("return value", "fault_support.ErrorAtPickle", "could not be pickled"),
        subset=True,
    ),
    Fault(
        "unpicklable-result",
        return_lock,
        raises=SerializationError,
        message=("return value", "_thread.lock", "could not be pickled"),
    ),
    Fault(
        "exit-at-result-pickle",
        return_instance,
        (ExitAtPickle,),
        raises=TerminatedWorkerError,
        message=("exited with code 4",),
    ),
    Fault(
        # SystemExit from a reducer is the task's error, as an exception would be; the
        # worker lives on (tests/test_pool_lifecycle.py checks its pid).
        "sys-exit-at-result-pickle",
        return_instance,
        (SysExitAtPickle,),
        raises=SerializationError,
        message=("return value", "could not be pickled", "SystemExit"),
        subset=True,
    ),
    Fault(
        "crash-at-result-pickle",
        return_instance,
        (CrashAtPickle,),
        raises=TerminatedWorkerError,
        message=("SIGKILL",),
        subset=True,
    ),
    # -- unpickling the result, in the web process ---------------------------------------
    Fault(
        "error-at-result-unpickle",
        return_instance,
        (ErrorAtUnpickle,),
        raises=SerializationError,
        message=("could not be unpickled in the web process", "FaultError"),
        subset=True,
    ),
    Fault(
        # CPython's "exit during result unpickle in result_handler": a SystemExit raised
        # while the web process rebuilds a result must fail that task, not the pool.
        "sys-exit-at-result-unpickle",
        return_instance,
        (SysExitAtUnpickle,),
        raises=SerializationError,
        message=("could not be unpickled in the web process",),
    ),
    # -- the task's exception travelling back -------------------------------------------
    Fault(
        "unrebuildable-exception",
        raise_two_arg_error,
        raises=SerializationError,
        message=("TwoArgError", "two-arg error message", "could not be rebuilt"),
        subset=True,
    ),
    Fault(
        "unpicklable-exception",
        raise_lock_error,
        raises=SerializationError,
        message=("LockError", "an error holding a lock", "could not be pickled"),
    ),
]

PARAMS = [
    pytest.param(fault, f"process-{method}", id=f"{method}-{fault.id}")
    for method in (FULL_TABLE_METHOD, *SUBSET_METHODS)
    for fault in FAULTS
    if method == FULL_TABLE_METHOD or fault.subset
]


def assert_pool_usable(executor: Executor, tmp_path: Path) -> None:
    """Normal tasks work, and both worker slots run at once (a dead worker was replaced)."""
    futures = [executor.submit(square, i) for i in range(6)]
    assert [f.result(timeout=WAIT) for f in futures] == [0, 1, 4, 9, 16, 25]
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    both = [executor.submit(rendezvous, str(meeting), str(i), 2) for i in range(2)]
    assert len({f.result(timeout=WAIT) for f in both}) == 2


@pytest.mark.parametrize(("fault", "executor_type"), PARAMS)
def test_fault(
    fault: Fault, app: Flask, make_executor: MakeExecutor, gates: Gates, tmp_path: Path
) -> None:
    executor = make_executor(app, EXECUTOR_MAX_WORKERS=2)
    # A task submitted before the bad one, and still running on the other worker while
    # the bad one fails.
    started, gate = str(tmp_path / "bystander-started"), gates.new()
    bystander = executor.submit(block_until, started, gate, "bystander")
    wait_for_path(started)

    exc: BaseException | None
    if fault.at_submit:
        with pytest.raises(fault.raises) as info:
            executor.submit(fault.fn, *fault.args, **fault.kwargs)
        exc = info.value
    else:
        future = executor.submit(fault.fn, *fault.args, **fault.kwargs)
        exc = future.exception(timeout=WAIT)
        with pytest.raises(fault.raises):
            future.result(timeout=0)
    assert type(exc) is fault.raises, repr(exc)
    for part in fault.message:
        assert part in str(exc), f"{part!r} not in {str(exc)!r}"
    if fault.raises is TerminatedWorkerError:
        assert isinstance(exc, BrokenProcessPool)

    assert not bystander.done(), "the bystander task was disturbed by the bad one"
    touch(gate)
    assert bystander.result(timeout=WAIT) == "bystander"

    assert_pool_usable(executor, tmp_path)


UNDER_TBLIB = """
import fault_support  # its exceptions defined first, as when a test run imports it
import distributed  # noqa: F401  (importing it installs tblib's exception pickling for them)
from flask import Flask
from flask_executor import Executor, SerializationError

app = Flask("undertblib")
app.config.update(EXECUTOR_TYPE="process", EXECUTOR_START_METHOD="fork", EXECUTOR_MAX_WORKERS=1)
executor = Executor(app)
with app.app_context():
    error = executor.submit(fault_support.raise_two_arg_error).exception(timeout=30)
executor.shutdown(wait=True)
print(type(error).__name__, error)
"""


def test_the_unrebuildable_exception_stays_so_where_dask_installed_tblib(tmp_path: Path) -> None:
    """Importing ``distributed`` installs tblib's exception pickling for every
    exception class defined by then, which rebuilds one whose ``__init__``
    wants other arguments than its ``args``; a ``fork`` worker inherits it.
    The fault table's unrebuildable exception must stay unrebuildable there
    (a CI run failed when a Dask test had run earlier in the same process)."""
    from test_lifecycle import run_script

    done = run_script(tmp_path, UNDER_TBLIB)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("SerializationError "), done.stdout + done.stderr
    assert "could not be rebuilt" in done.stdout, done.stdout
