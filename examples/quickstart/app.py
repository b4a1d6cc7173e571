"""Quickstart: a thread pool, fire-and-forget tasks and a stored, polled one.

* ``POST /report`` starts a report with ``submit_stored``; ``GET /report``
  polls it and hands the result over once (the Flask-Executor 1.0 pattern).
* ``POST /signup`` submits ``send_email`` and answers at once; the task reads
  ``request.form`` and ``g.user`` from a copy of the view's context.

Run it with ``.venv/bin/python examples/quickstart/app.py``: it drives itself with
Flask's test client and prints what the tasks saw.
"""

from __future__ import annotations

import logging
import sys
import time

from flask import Flask, current_app, g, jsonify, request

from flask_executor import Executor

app = Flask(__name__)
executor = Executor(app)  # EXECUTOR_TYPE defaults to "thread"


@app.before_request
def load_user() -> None:
    g.user = request.headers.get("X-User", "anonymous")


def send_email() -> None:
    # Runs in a worker thread, with a copy of the view's request and g.
    email = request.form["email"]
    current_app.logger.info(
        "send_email saw: form email=%s, g.user=%s, path=%s", email, g.user, request.path
    )


def build_report(year: int) -> dict[str, object]:
    time.sleep(0.3)  # pretend this is slow
    return {"year": year, "requested by": g.user, "orders": sum(range(year))}


@app.post("/signup")
def signup():  # type: ignore[no-untyped-def]
    executor.submit(send_email)
    return "Welcome! Check your inbox.\n"


@app.post("/report")
def start_report():  # type: ignore[no-untyped-def]
    executor.submit_stored("report", build_report, request.args.get("year", 2024, type=int))
    return jsonify(status="started"), 202


@app.get("/report")
def report_status():  # type: ignore[no-untyped-def]
    if "report" not in executor.futures:
        return jsonify(status="not started"), 404
    if not executor.futures.done("report"):
        return jsonify(status=executor.futures.state("report"))
    future = executor.futures.pop("report")
    return jsonify(status="done", result=future.result())


def say(line: str) -> None:
    """One write per line, so a task's log line never lands in the middle."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    client = app.test_client()

    say("1. POST /report?year=2024, then poll GET /report")
    client.post("/report?year=2024", headers={"X-User": "bob"})
    deadline = time.monotonic() + 30
    while True:
        body = client.get("/report").get_json()
        say(f"   poll: {body['status']}")
        if body["status"] == "done" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    say(f"   build_report saw: {body.get('result')}")

    say("2. POST /signup")
    response = client.post(
        "/signup", data={"email": "alice@example.com"}, headers={"X-User": "alice"}
    )
    say(f"   view answered: {response.get_data(as_text=True).strip()}")

    executor.shutdown()  # waits for send_email
    say("done.")


class _Indented(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return "   " + super().format(record)


if __name__ == "__main__":
    # The task logs through app.logger; one line per record, never interleaved.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Indented("%(message)s"))
    app.logger.handlers[:] = [handler]
    app.logger.setLevel(logging.INFO)
    main()
