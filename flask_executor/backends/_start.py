"""Starting worker processes: which start method, what the fork server
preloads, whether the web process's main script can be started from, and the
errors that say how a worker ended."""

from __future__ import annotations

import ast
import inspect
import multiprocessing
import signal
import sys
from concurrent.futures.process import BrokenProcessPool
from types import FrameType
from typing import Any

from ..errors import ShutdownTimeoutError, TerminatedWorkerError
from ..serialize import type_name

__all__ = [
    "FORK_SERVER_PRELOAD",
    "check_main_guard",
    "death_error",
    "default_start_method",
    "how_it_ended",
    "init_error",
    "preload_fork_server",
    "shutdown_error",
    "start_error",
]


def default_start_method() -> str:
    """``forkserver`` where the platform has it, else ``spawn``: never
    ``fork``, which is unsafe in a multi-threaded web server."""
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


#: What the fork server imports once, before it forks any worker, so that no
#: worker imports it again: the worker's own code (and with it Flask and
#: Werkzeug; not cloudpickle, which only a call by value needs), the stdlib
#: modules every forkserver worker imports while it unpickles its start-up
#: arguments (the socket it serves is passed as a
#: ``popen_forkserver`` descriptor), and the codec Werkzeug loads to rebuild
#: the first request. Only modules whose import has no effect beyond defining
#: things: never the web process's ``__main__`` or the app's modules, whose top
#: level each worker runs itself (and whose errors are reported as a worker
#: start failure, see :func:`start_error`).
FORK_SERVER_PRELOAD = (
    "flask_executor.backends._worker",
    "multiprocessing.popen_forkserver",
    "encodings.idna",
)


def preload_fork_server(context: Any) -> None:
    """Have the fork server of ``context`` (a :mod:`multiprocessing`
    context) import :data:`FORK_SERVER_PRELOAD`; nothing for other start
    methods. Call it before the context starts its first process: the fork
    server is started then, and keeps what it imported for its lifetime.

    A worker forked from it starts with these modules imported, so a
    replacement worker (after a crash, a time limit or
    ``EXECUTOR_MAX_TASKS_PER_CHILD``) imports nothing for its first context
    task but the modules of the task itself. The package's web side (the
    ``executor`` front, ``jobs``, ``status``, ``tracing``, the dashboard) is
    not among them: workers never run it, and the package imports it only
    when a public name is used.
    """
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload(list(FORK_SERVER_PRELOAD))


def check_main_guard(start_method: str) -> None:
    """Fail the first ``submit()`` of a script that submits while it is being
    run, outside an ``if __name__ == "__main__":`` block.

    ``spawn`` and ``forkserver`` workers import the web process's main script
    (as ``__mp_main__``) to find the functions defined in it; a script that
    submits at its top level would submit again in every worker, while the
    worker is still starting, and the worker dies. This says so at once, in
    the web process, instead. ``fork`` workers never import the script.

    :raises RuntimeError: the call stack shows such a submit; the message says
        what to change.
    """
    if start_method == "fork":
        return
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if main is None or path is None or getattr(main, "__spec__", None) is not None:
        return  # python -c, a REPL, python -m: workers do not run the script
    frame = _main_module_frame(main.__dict__)
    if frame is None or _in_main_guard(path, frame.f_lineno):
        return
    raise RuntimeError(
        f"{path}, line {frame.f_lineno}: this script submits a task to a process pool while"
        " the script itself is being run, outside an `if __name__ == \"__main__\":` block."
        f" With the {start_method!r} start method every worker process imports the script"
        " to find its functions, and would submit again. Put the code that submits (and"
        " anything else that should run only once, such as app.run()) under"
        " `if __name__ == \"__main__\":`, or set EXECUTOR_START_METHOD = 'fork' (what"
        " Flask-Executor 1.0 used on Linux)."
    )


def _main_module_frame(main_globals: dict[str, Any]) -> FrameType | None:
    """The frame running the main script's top level, if it is on this stack."""
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is main_globals:
            return frame
        frame = frame.f_back
    return None


def _in_main_guard(path: str, line: int) -> bool:
    """Whether ``line`` of the script at ``path`` is inside a top-level
    ``if __name__ == "__main__":`` block (``True`` when that cannot be told)."""
    try:
        with open(path, encoding="utf-8") as file:
            tree = ast.parse(file.read(), path)
    except (OSError, SyntaxError, ValueError):
        return True
    for node in tree.body:
        if isinstance(node, ast.If) and _is_main_test(node.test):
            end = node.end_lineno or node.lineno
            if node.lineno <= line <= end:
                return True
    return False


def _is_main_test(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        return False
    if not isinstance(test.ops[0], ast.Eq):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    values = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return bool(names and values)


def how_it_ended(process: Any) -> str:
    code = process.exitcode
    if code is None:
        return "stopped responding"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    return f"exited with code {code}"


def death_error(process: Any) -> TerminatedWorkerError:
    """The error of the task a worker was running when it died."""
    return TerminatedWorkerError(
        f"the worker process (pid {process.pid}) running this task {how_it_ended(process)};"
        " only this task failed, a replacement worker starts for the others"
    )


def start_error(process: Any, how: str, cause: BaseException | None = None) -> BaseException:
    """A worker (``process``, or ``None`` if none could be started) that never came up."""
    pid = f" (pid {process.pid})" if process is not None else ""
    error = TerminatedWorkerError(f"a worker process{pid} {how}, before it took a task")
    error.__cause__ = cause
    return error


def init_error(name: str | None, cause: BaseException) -> BaseException:
    """The worker initializer ``name`` raised ``cause`` (which carries its traceback)."""
    error = BrokenProcessPool(
        f"the worker initializer (EXECUTOR_WORKER_INIT = {name!r}) raised"
        f" {type_name(cause)}: {cause}; its traceback is this error's cause"
    )
    error.__cause__ = cause
    return error


def shutdown_error(process: Any, timeout: float) -> ShutdownTimeoutError:
    """A task still running when the shutdown timeout ran out (the same error
    the thread and Dask backends give, see ``stop_unfinished``)."""
    return ShutdownTimeoutError(
        "the pool was shut down while this task was running: it did not finish within the"
        f" shutdown timeout ({timeout:g} s, EXECUTOR_SHUTDOWN_TIMEOUT); its worker (pid"
        f" {process.pid}) was killed"
    )
