"""Progress: a process-pool job reports progress; the page shows a live bar.

* ``POST /start`` submits ``crunch`` to a **process** pool under a fresh key;
  the job calls ``current_task.update(progress=..., stage=...)`` as it goes.
* ``GET /tasks/<key>`` is the ready-made JSON status endpoint,
  ``executor.status_blueprint()``: state, the job's meta so far, and the
  result once finished.
* ``GET /`` is a page with a Start button and a ``<progress>`` bar that
  polls ``/tasks/<key>`` every 300 ms.

``flask --app examples/progress/app.py run`` serves the page, and so does
``gunicorn -w 3 --chdir examples/progress app:app``: the tasks live in a SQLite
file in the instance folder (``EXECUTOR_STORE``), so whichever worker answers a
poll sees the job another worker started. Run it with
``python examples/progress/app.py`` and it drives itself with Flask's test
client instead, printing each progress value it sees while the job runs.
Settings can come from the environment: ``FLASK_SECRET_KEY``,
``FLASK_EXECUTOR_STORE``.
"""

from __future__ import annotations

import os
import time
import uuid

from flask import Flask, jsonify, render_template

from flask_executor import Executor, current_task

# The instance folder (where the task store's file goes) next to this file,
# however the app is started.
app = Flask(
    __name__, instance_path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "instance")
)
app.config.update(
    EXECUTOR_TYPE="process",
    # Shared by every process of the app (gunicorn -w N): a file in app.instance_path.
    EXECUTOR_STORE="sqlite:///progress-tasks.db",
    # Stored results are signed with a key derived from it: set your own.
    SECRET_KEY="dev only: set FLASK_SECRET_KEY",
)
app.config.from_prefixed_env()
executor = Executor(app)
# Keys are random UUIDs handed only to the browser that started the job, so
# knowing one is the permission to see it; list_keys stays off.
app.register_blueprint(executor.status_blueprint(authorize=lambda: True), url_prefix="/tasks")


def crunch(steps: int = 10) -> int:
    """Runs in a worker process; each update reaches the web process at once."""
    total = 0
    for i in range(steps):
        current_task.update(progress=i / steps, stage=f"step {i + 1} of {steps}")
        time.sleep(0.25)  # the real work goes here
        total += i * i
    current_task.update(progress=1.0, stage="done")
    return total


@app.get("/")
def index() -> str:
    return render_template("index.html")


@app.post("/start")
def start():  # type: ignore[no-untyped-def]
    key = uuid.uuid4().hex
    executor.submit_stored(key, crunch)
    return jsonify(key=key), 202


def main() -> None:
    client = app.test_client()
    assert "<progress" in client.get("/").get_data(as_text=True)
    print("GET / has a <progress> bar")

    key = client.post("/start").get_json()["key"]
    print("POST /start: job", key)
    seen = None
    deadline = time.monotonic() + 60
    while True:
        task = client.get(f"/tasks/{key}").get_json()
        meta = task["meta"] or {}
        if meta.get("progress") != seen:
            seen = meta["progress"]
            print(f"  {task['state']:8} progress={seen} ({meta['stage']})")
        if task["state"] in ("finished", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    print("state:", task["state"])
    print("result:", task["result"], task["error"] or "")
    executor.shutdown()


if __name__ == "__main__":  # process workers import this module; don't run the demo there
    main()
