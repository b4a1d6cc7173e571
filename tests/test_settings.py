"""The settings table: every key documented, every key read, bad values named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flask import Flask

from flask_executor import Executor
from flask_executor.settings import SETTINGS

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_documented_in_config_rst_and_the_readme() -> None:
    config_rst = (ROOT / "docs" / "config.rst").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\.\. data:: (EXECUTOR_\w+)", config_rst, flags=re.M))
    missing = [s.name for s in SETTINGS if s.name not in documented]
    assert not missing, f"not documented as `.. data::` in docs/config.rst: {missing}"
    not_in_readme = [s.name for s in SETTINGS if f"`{s.name}`" not in readme]
    assert not not_in_readme, f"not in the README's configuration table: {not_in_readme}"
    undeclared = documented - {s.name for s in SETTINGS}
    assert not undeclared, f"documented but not in flask_executor.settings: {undeclared}"


def test_init_app_sets_every_default_with_the_executor_prefix() -> None:
    app = Flask(__name__)
    executor = Executor(app, name="reports")
    try:
        for setting in SETTINGS:
            assert f"REPORTS_{setting.name}" in app.config
            assert setting.name not in app.config
    finally:
        executor.shutdown()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("EXECUTOR_TYPE", "celery", "REPORTS_EXECUTOR_TYPE = 'celery' is not a valid"),
        ("EXECUTOR_MAX_WORKERS", "many", "REPORTS_EXECUTOR_MAX_WORKERS = 'many' is not a whole"),
        ("EXECUTOR_MAX_WORKERS", 0, "REPORTS_EXECUTOR_MAX_WORKERS = 0 must be at least 1"),
        ("EXECUTOR_TASK_TIMEOUT", -1, "REPORTS_EXECUTOR_TASK_TIMEOUT = -1 must be more than 0"),
        ("EXECUTOR_START_METHOD", "clone", "REPORTS_EXECUTOR_START_METHOD = 'clone' is not a"),
    ],
)
def test_a_bad_value_names_the_prefixed_key(key: str, value: object, message: str) -> None:
    app = Flask(__name__)
    app.config[f"REPORTS_{key}"] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        Executor(app, name="reports")
