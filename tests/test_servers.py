"""The test servers themselves: start on a free loopback port, answer, stop leaving nothing."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from servers import GunicornServer, RedisServer, session_pids

APP = '''
import os
from flask import Flask
app = Flask(__name__)

@app.get("/pid")
def pid():
    return str(os.getpid())
'''


@pytest.mark.slow
def test_gunicorn_serves_from_several_workers_and_stops_clean(tmp_path: Path) -> None:
    (tmp_path / "tinyapp.py").write_text(APP)
    with GunicornServer("tinyapp:app", cwd=tmp_path, workers=2) as server:
        workers = set(server.worker_pids())
        assert len(workers) == 2
        answers = {server.get("/pid").text for _ in range(20)}
        assert answers <= {str(pid) for pid in workers}
        sid = server.pid
    assert session_pids(sid) == []


@pytest.mark.slow
def test_stop_reports_a_leftover_process(tmp_path: Path) -> None:
    (tmp_path / "leaky.py").write_text(
        APP + "\nimport subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    )
    server = GunicornServer("leaky:app", cwd=tmp_path, workers=1)
    with pytest.raises(AssertionError, match="left processes running"):
        server.stop()
    assert session_pids(server.pid) == []


def test_redis_server_answers_and_stops(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        with socket.create_connection((server.host, server.port), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            assert sock.recv(16).startswith(b"+PONG")
        pid = server.pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
