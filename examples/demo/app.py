"""flask-executor demo: one app, a thread executor and a process executor.

Drives the app end to end with Flask's test client and prints what each
background task saw of the request that submitted it:

* ``/signup`` (thread pool): the task reads ``request.form``, ``g.user``,
  ``session`` and ``url_for(..., _external=True)`` from a copy of the view's
  context;
* ``/reports/<year>`` (process pool, CPU-bound): the task runs in another
  process, yet reads ``request.args``, ``g.user`` and ``current_app.config``
  rebuilt from the snapshot taken at submit time; the page polls its stored
  future until it is done;
* two users at once: each task sees its own user, never the other's (the bug
  Flask-Executor 1.0 has under ``fork``).

Run it with ``.venv/bin/python examples/demo/app.py``;
``examples/dask_demo/app.py`` runs the same app with its reports on an
embedded Dask cluster.
"""

from __future__ import annotations

import os
import time

from flask import Flask, current_app, g, jsonify, request, session, url_for

from flask_executor import Executor

app = Flask(__name__)
app.config.update(
    SECRET_KEY="demo-only",
    SHOP_NAME="Demo Shop",
    # "process" here; examples/dask_demo/app.py sets "dask": the tasks do not change.
    REPORTS_EXECUTOR_TYPE=os.environ.get("DEMO_REPORTS_BACKEND", "process"),
    REPORTS_EXECUTOR_MAX_WORKERS=2,
    REPORTS_EXECUTOR_SNAPSHOT_CONFIG_EXCLUDE=["SECRET_KEY"],
)
mail = Executor(app)  # thread pool (the default)
reports = Executor(app, name="reports")  # process pool


@app.before_request
def load_user() -> None:
    g.user = request.headers.get("X-User", "anonymous")


def send_welcome(email: str) -> str:
    """A thread task: everything the view had is there, as a copy."""
    return (
        f"thread task for {g.user}: mailed {email} from {request.path}"
        f" (form plan={request.form['plan']}, session visits={session['visits']},"
        f" link {url_for('report', year=2024, _external=True)})"
    )


def yearly_report(year: int) -> dict[str, object]:
    """A process task: CPU-bound, in another process, with the view's context."""
    total = sum(i * i % 97 for i in range(300_000 + year))
    return {
        "worker pid": os.getpid(),
        "user": g.user,
        "region": request.args.get("region"),
        "shop": current_app.config["SHOP_NAME"],
        "SECRET_KEY in worker": current_app.config.get("SECRET_KEY"),  # excluded
        "total": total,
    }


@app.post("/signup")
def signup():  # type: ignore[no-untyped-def]
    session["visits"] = session.get("visits", 0) + 1
    future = mail.submit(send_welcome, request.form["email"])
    return future.result(timeout=30)


@app.post("/reports/<int:year>")
def start_report(year: int):  # type: ignore[no-untyped-def]
    key = f"{g.user}-{year}"
    reports.submit_stored(key, yearly_report, year)
    return jsonify(key=key), 202


@app.get("/reports/<int:year>")
def report(year: int):  # type: ignore[no-untyped-def]
    key = f"{g.user}-{year}"
    if key not in reports.futures:
        return jsonify(state="unknown"), 404
    if not reports.futures.done(key):
        return jsonify(state="running")
    return jsonify(state="done", result=reports.futures.pop(key).result())


def main() -> None:
    print(f"web process pid {os.getpid()}\n")
    client = app.test_client()

    print("1. thread pool, a copy of request, g and session:")
    response = client.post(
        "/signup", data={"email": "alice@example.com", "plan": "pro"}, headers={"X-User": "alice"}
    )
    print("  ", response.get_data(as_text=True), "\n")

    backend = app.config["REPORTS_EXECUTOR_TYPE"]
    print(f"2. {backend} pool, two users at once, each polling its stored future:")
    for user, region in (("alice", "eu"), ("bob", "us")):
        client.post(f"/reports/2024?region={region}", headers={"X-User": user})
    for user in ("alice", "bob"):
        deadline = time.monotonic() + 60
        while True:
            body = client.get("/reports/2024", headers={"X-User": user}).get_json()
            if body["state"] == "done" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        print(f"   {user}'s report:", body)
        assert body["state"] == "done" and body["result"]["user"] == user, body

    mail.shutdown()
    reports.shutdown()
    print("\ndone: every task saw its own request, g and config.")


if __name__ == "__main__":  # process workers import this module; don't run the demo there
    main()
