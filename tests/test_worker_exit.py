"""A process worker whose web process is gone exits without a word.

The worker's watcher thread ends the process the moment the web process's end
of its socket closes; the serving thread may get there first, writing to that
closed socket (its "ready" while it starts, a result). That write must end the
worker quietly too: an exception escaping the worker's entry point makes
``multiprocessing`` print ``Process flask-executor-worker:`` and a traceback,
cut short by the watcher's exit (seen at the end of the README's demo).
"""

from __future__ import annotations

import pickle
import signal
import threading
import time

from flask_executor.backends._channel import channel_pair, split_header
from flask_executor.backends._worker import _Calls, _serve

TIMEOUT = 30.0


def test_serving_ends_quietly_when_the_web_process_end_is_closed() -> None:
    ours, theirs = channel_pair()
    ours.close()  # the web process is gone before the worker says it is ready
    previous = signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as in any Python process
    try:
        _serve(theirs, None, _Calls(theirs))  # returns: no BrokenPipeError
    finally:
        signal.signal(signal.SIGPIPE, previous)
        theirs.close()


def test_serving_ends_quietly_when_a_result_cannot_be_written() -> None:
    # The worker says it is ready; then a call, "stop", and the web process
    # closes its end: the worker runs the call and writes its result to nobody.
    ours, theirs = channel_pair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            _serve(theirs, None, _Calls(theirs))
        except BaseException as exc:
            errors.append(exc)

    previous = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    worker = threading.Thread(target=serve)
    worker.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ours.receive():  # its "ready"
            assert time.monotonic() < deadline, "the worker never said it was ready"
            time.sleep(0.005)
        header = split_header(("call", 1, "", False, False))
        ours.send(header, pickle.dumps((time.sleep, (0.2,), {}, None), pickle.HIGHEST_PROTOCOL))
        ours.send(pickle.dumps(("stop",)))
        while ours.sending:
            ours.flush()
        ours.close()
        worker.join(TIMEOUT)
        assert not worker.is_alive()
    finally:
        signal.signal(signal.SIGPIPE, previous)
        theirs.close()
    assert errors == []
