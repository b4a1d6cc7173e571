"""Real servers for tests: gunicorn and redis-server on free loopback ports.

Each server is started by the test that needs it, in its own session (``setsid``), on a
port of its own on 127.0.0.1, and stopped by pid when the ``with`` block ends, even when
the test fails. Stopping also checks that no process of that session is left (gunicorn
workers, process-pool workers, a fork server): a leftover process fails the test.

    with GunicornServer("myapp:app", workers=3, cwd=tmp_path) as server:
        requests = server.get("/tasks/report")
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

#: Seconds a server may take to start answering, and to stop.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _processes() -> list[tuple[int, str, int, int]]:
    """``(pid, state, ppid, session id)`` of every process, from ``/proc/*/stat``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the name: state, ppid, pgrp, session (proc(5)).
        found.append((int(entry), fields[0], int(fields[1]), int(fields[3])))
    return found


def session_pids(sid: int) -> list[int]:
    """Pids of the live (not zombie) processes whose session id is ``sid``."""
    return [pid for pid, state, _, session in _processes() if state != "Z" and session == sid]


def children(pid: int) -> list[int]:
    """Pids of the live direct children of ``pid``."""
    return [child for child, state, ppid, _ in _processes() if state != "Z" and ppid == pid]


class Response:
    """An HTTP answer: ``status``, ``body`` (bytes), ``text`` and ``json()``."""

    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.body[:200]!r}>"


class _Server:
    """A process started in its own session, stopped by pid, checked for leftovers."""

    name = "server"
    proc: subprocess.Popen[bytes]

    def __init__(self) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"

    def _spawn(self, argv: Sequence[str], cwd: str | os.PathLike[str], env: dict[str, str],
               log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        """What the server printed so far."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def _ready(self) -> bool:
        raise NotImplementedError

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready:\n"
                    f"{self.output()}"
                )
            if time.monotonic() > deadline:
                self.stop(check=False)
                raise TimeoutError(
                    f"{self.name} not ready within {START_TIMEOUT} s:\n{self.output()}"
                )
            time.sleep(0.05)

    def stop(self, check: bool = True, sig: int = signal.SIGTERM) -> None:
        """Stop the server by pid (``sig``, then SIGKILL after ``STOP_TIMEOUT``); then check
        that no process of its session is left (they are killed either way)."""
        sid = self.proc.pid
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)
        # Give the session's other processes (workers of workers) the time they are
        # promised to exit in, then kill and report whatever is left.
        deadline = time.monotonic() + 5.0
        left = session_pids(sid)
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = session_pids(sid)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # SIGKILL is not instant: wait (bounded) until the killed ones are gone too.
        deadline = time.monotonic() + STOP_TIMEOUT
        while left and session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self._log.closed:
            self._log.close()
        if check and left:
            raise AssertionError(
                f"{self.name} (pid {sid}) left processes running after it stopped: {left}\n"
                f"{self.output()}"
            )

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # A failing test still stops the server; only a passing one is failed by leftovers.
        self.stop(check=exc is None)


@functools.lru_cache(maxsize=1)
def _no_control_socket() -> tuple[str, ...]:
    """Recent gunicorn opens a control socket at one fixed path per user
    (``~/.gunicorn/gunicorn.ctl``), which servers running side by side would share:
    turn it off where the installed gunicorn has it."""
    gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable)) or "gunicorn"
    help_text = subprocess.run([gunicorn, "--help"], capture_output=True, text=True,
                               timeout=60).stdout
    return ("--no-control-socket",) if "--no-control-socket" in help_text else ()


class GunicornServer(_Server):
    """``gunicorn APP`` with ``workers`` sync workers on a free loopback port.

    :param app: the WSGI app spec (``module:variable``), importable from ``cwd``.
    :param workers: ``-w``.
    :param args: more command-line arguments (``--preload``, ``--timeout 5``, ``-k gevent``).
    :param env: extra environment variables.
    :param cwd: the working directory; also put first on ``PYTHONPATH``.
    """

    name = "gunicorn"

    def __init__(self, app: str, *, cwd: str | os.PathLike[str], workers: int = 2,
                 args: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        super().__init__()
        gunicorn = shutil.which("gunicorn", path=os.path.dirname(sys.executable))
        argv = [gunicorn or "gunicorn", "-w", str(workers), "-b", f"{self.host}:{self.port}",
                "--graceful-timeout", "10", *_no_control_socket(), *args, app]
        tests_dir = str(Path(__file__).resolve().parent)
        full_env = {**os.environ, **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(cwd), tests_dir, full_env.get("PYTHONPATH", "")) if p
        )
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.workers = workers
        self._spawn(argv, cwd, full_env, Path(cwd) / f"gunicorn-{self.port}.log")
        self.wait_ready()

    def _ready(self) -> bool:
        if len(self.worker_pids()) < self.workers:
            return False
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def worker_pids(self) -> list[int]:
        """The gunicorn worker processes (the master's direct children that are not
        forkservers or resource trackers of a preloaded app)."""
        pids = []
        for pid in children(self.proc.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmd:
                    cmdline = cmd.read()
            except OSError:
                continue
            if b"multiprocessing" not in cmdline:
                pids.append(pid)
        return pids

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30.0) -> Response:
        """One HTTP request on a new connection (so gunicorn may route it to any worker)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            answer = conn.getresponse()
            return Response(answer.status, answer.read(), dict(answer.getheaders()))
        finally:
            conn.close()

    def get(self, path: str, **kwargs: Any) -> Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: bytes | None = b"", **kwargs: Any) -> Response:
        return self.request("POST", path, body=body, **kwargs)


class RedisServer(_Server):
    """A throwaway ``redis-server`` on a free loopback port, persisting nothing.

    ``url`` is ``redis://127.0.0.1:PORT/0``; ``password`` sets ``requirepass``.
    """

    name = "redis-server"

    def __init__(self, directory: str | os.PathLike[str], password: str | None = None) -> None:
        super().__init__()
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed: `apt-get install redis-server` (.ci/run does)"
            )
        argv = [binary, "--port", str(self.port), "--bind", self.host, "--dir", str(directory),
                "--save", "", "--appendonly", "no", "--daemonize", "no"]
        if password:
            argv += ["--requirepass", password]
        self.password = password
        self._spawn(argv, directory, dict(os.environ), Path(directory) / f"redis-{self.port}.log")
        self.wait_ready()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def _ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                answer = sock.recv(64)
        except OSError:
            return False
        return answer.startswith((b"+PONG", b"-NOAUTH"))
