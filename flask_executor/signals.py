"""Signals, in Flask's style (:mod:`blinker`, ``sender`` = the app).

Each is sent in the web process with ``future=`` and ``key=`` (the key of
:meth:`~flask_executor.Executor.submit_stored`, else ``None``)::

    from flask_executor.signals import task_failed

    @task_failed.connect_via(app)
    def report(app, future, key, exception, **extra):
        app.logger.error("task %s failed: %s", key, exception)

``task_finished`` and ``task_failed`` are sent from the thread that completes
the future, for tasks submitted while a receiver of either was connected.

.. versionadded:: 2.0
"""

from __future__ import annotations

from blinker import Namespace

__all__ = ["task_failed", "task_finished", "task_submitted"]

_signals = Namespace()

#: A task was handed to the executor's workers.
task_submitted = _signals.signal("task-submitted")
#: A task returned; also sent with ``result=``.
task_finished = _signals.signal("task-finished")
#: A task raised (or its worker died, or it timed out); also sent with ``exception=``.
task_failed = _signals.signal("task-failed")
