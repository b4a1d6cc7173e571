"""App factory + Flask-SQLAlchemy: ``db.session`` inside process workers.

``db`` and ``executor`` are created at module level and bound to the app in
``create_app()``. With ``EXECUTOR_APP_FACTORY = "app:create_app"`` each
process worker builds the real app once, so ``db`` is initialised there too,
and every task runs in that app's context: ``db.session`` just works, and is
removed when the task's app context ends.

The database URI comes from ``REPORTS_DATABASE_URI`` (the script sets it to a
SQLite file in a fresh temporary directory); workers inherit the variable.

Run it with ``.venv/bin/python examples/sqlalchemy_factory/app.py``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from flask import Flask, jsonify
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import func
from sqlalchemy.orm import Mapped, mapped_column

from flask_executor import Executor

db = SQLAlchemy()
executor = Executor()


class Report(db.Model):  # type: ignore[name-defined,misc]
    id: Mapped[int] = mapped_column(primary_key=True)
    region: Mapped[str]
    total: Mapped[int]
    worker_pid: Mapped[int]


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=os.environ.get("REPORTS_DATABASE_URI", "sqlite:///reports.db"),
        EXECUTOR_TYPE="process",
        EXECUTOR_MAX_WORKERS=2,
        # Workers call this factory once: their app has db initialised.
        EXECUTOR_APP_FACTORY="app:create_app",
    )
    db.init_app(app)
    executor.init_app(app)
    app.add_url_rule("/reports/<region>", view_func=start_report, methods=["POST"])
    return app


@executor.job
def build_report(region: str, orders: list[int]) -> dict[str, int]:
    """Runs in a worker process: write a row, then aggregate over the table."""
    db.session.add(Report(region=region, total=sum(orders), worker_pid=os.getpid()))
    db.session.commit()
    count, grand_total = db.session.execute(
        db.select(func.count(Report.id), func.sum(Report.total))
    ).one()
    return {"reports": count, "grand_total": grand_total, "worker_pid": os.getpid()}


def start_report(region: str):  # type: ignore[no-untyped-def]
    future = build_report.submit(region, [120, 80, 45] if region == "eu" else [300])
    return jsonify(future.result(timeout=30))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["REPORTS_DATABASE_URI"] = f"sqlite:///{Path(tmp) / 'reports.db'}"
        app = create_app()
        with app.app_context():
            db.create_all()

        client = app.test_client()
        for region in ("eu", "us"):
            response = client.post(f"/reports/{region}")
            assert response.status_code == 200, response.get_data(as_text=True)
            print(f"POST /reports/{region}:", response.get_json())

        print(f"rows the workers wrote, read back by the web process (pid {os.getpid()}):")
        with app.app_context():
            for row in db.session.scalars(db.select(Report).order_by(Report.id)):
                print(f"  {row.region}: total={row.total}, written by pid {row.worker_pid}")
        executor.shutdown()


if __name__ == "__main__":  # process workers import this file; don't run the demo there
    main()
