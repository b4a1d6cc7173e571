"""Hostile input and secrets (issue 12): what crosses to workers, and what an attacker
can make the web process do. See docs/security.rst."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask, current_app
from support import TIMEOUT, create_app

from flask_executor import ConfigKeyNotCopiedError, Executor

Register = Callable[[Executor], Executor]

SECRETS = {
    "SECRET_KEY": "web-secret",
    "SECRET_KEY_FALLBACKS": ["old-secret"],
    "DB_PASSWORD": "web-password",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "GITHUB_TOKEN": "gh-token",
    "STRIPE_API_KEY": "sk-live",
    "DATABASE_URL": "postgresql://app:hunter2@db.example/app",
}
PLAIN = {
    "DB_HOST": "db.example",
    "PUBLIC_URL": "https://shop.example/",
    "SQLALCHEMY_DATABASE_URI": "sqlite:///app.db",
}


def config_items(*keys: str) -> dict[str, Any]:
    """The given keys of the worker's config; absent keys are left out."""
    return {key: current_app.config[key] for key in keys if key in current_app.config}


def read_config(key: str) -> Any:
    return current_app.config[key]


def get_config(key: str) -> Any:
    return current_app.config.get(key, "default")


# -- 1. one app spec per executor -----------------------------------------------


@pytest.mark.parametrize("secure_first", [True, False])
def test_each_executor_applies_its_own_exclude_list(
    shutdown_after: Register, secure_first: bool
) -> None:
    app = create_app()
    app.config.update(
        SECRET_KEY="web-secret",
        DB_PASSWORD="web-password",
        DB_HOST="db.example",
        EXECUTOR_TYPE="process",
        SECURE_EXECUTOR_TYPE="process",
        SECURE_EXECUTOR_SNAPSHOT_CONFIG_EXCLUDE=["SECRET_KEY", "*_PASSWORD"],
        SECURE_EXECUTOR_DASK_SECURITY="secure-key-material",
        EXECUTOR_DASK_SECURITY="plain-key-material",
    )
    plain = shutdown_after(Executor(app))
    secure = shutdown_after(Executor(app, name="secure"))
    keys = (
        "SECRET_KEY",
        "DB_PASSWORD",
        "DB_HOST",
        "EXECUTOR_DASK_SECURITY",
        "SECURE_EXECUTOR_DASK_SECURITY",
    )
    order = [secure, plain] if secure_first else [plain, secure]
    with app.app_context():
        seen = {
            executor.name: executor.submit(config_items, *keys).result(timeout=TIMEOUT)
            for executor in order
        }
    # No executor ever sends any executor's Dask security (TLS key material).
    assert seen["secure"] == {"DB_HOST": "db.example"}
    assert seen[""] == {
        "SECRET_KEY": "web-secret",
        "DB_PASSWORD": "web-password",
        "DB_HOST": "db.example",
    }


# -- 2. secrets stay home on Dask ----------------------------------------------------


@pytest.fixture
def secret_app() -> Flask:
    app = create_app()
    app.config.update(SECRETS, **PLAIN)
    return app


def dask_executor(app: Flask, register: Register, address: str, **config: Any) -> Executor:
    # No factory: the worker's app is a stand-in, all its config comes from the web process.
    app.config.update(EXECUTOR_TYPE="dask", EXECUTOR_DASK_ADDRESS=address, **config)
    return register(Executor(app))


def test_dask_workers_do_not_get_secrets_by_default(
    secret_app: Flask, shutdown_after: Register, dask_scheduler_address: str
) -> None:
    executor = dask_executor(secret_app, shutdown_after, dask_scheduler_address)
    with secret_app.app_context():
        seen = executor.submit(config_items, *SECRETS, *PLAIN).result(timeout=TIMEOUT)
    assert seen == PLAIN


def test_dask_reading_a_left_out_key_says_which_setting_to_change(
    secret_app: Flask, shutdown_after: Register, dask_scheduler_address: str
) -> None:
    executor = dask_executor(secret_app, shutdown_after, dask_scheduler_address)
    with secret_app.app_context():
        with pytest.raises(ConfigKeyNotCopiedError) as info:
            executor.submit(read_config, "SECRET_KEY").result(timeout=TIMEOUT)
        # .get() still gives the default: only [] raises.
        assert executor.submit(get_config, "SECRET_KEY").result(timeout=TIMEOUT) == "default"
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "SECRET_KEY" in message and "EXECUTOR_SNAPSHOT_CONFIG_INCLUDE" in message


def test_dask_secrets_can_be_opted_in(
    secret_app: Flask, shutdown_after: Register, dask_scheduler_address: str
) -> None:
    executor = dask_executor(
        secret_app,
        shutdown_after,
        dask_scheduler_address,
        EXECUTOR_SNAPSHOT_CONFIG_INCLUDE=["SECRET_KEY", "*_TOKEN"],
    )
    with secret_app.app_context():
        seen = executor.submit(config_items, *SECRETS).result(timeout=TIMEOUT)
    assert seen == {"SECRET_KEY": "web-secret", "GITHUB_TOKEN": "gh-token"}


def test_excluded_key_raises_naming_the_exclude_setting(
    shutdown_after: Register,
) -> None:
    app = create_app()
    app.config.update(
        EXECUTOR_TYPE="process", EXECUTOR_SNAPSHOT_CONFIG_EXCLUDE=["SECRET_KEY"]
    )
    executor = shutdown_after(Executor(app))
    with app.app_context():
        with pytest.raises(ConfigKeyNotCopiedError, match="EXECUTOR_SNAPSHOT_CONFIG_EXCLUDE"):
            executor.submit(read_config, "SECRET_KEY").result(timeout=TIMEOUT)


def test_process_workers_keep_secrets(shutdown_after: Register) -> None:
    app = create_app()
    app.config.update(SECRETS, EXECUTOR_TYPE="process")
    executor = shutdown_after(Executor(app))
    with app.app_context():
        seen = executor.submit(config_items, *SECRETS).result(timeout=TIMEOUT)
    assert seen == SECRETS


def test_warns_once_for_a_remote_dask_address_without_tls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from flask_executor.backends.dask import _warn_if_plaintext

    caplog.set_level(logging.WARNING, logger="flask_executor")
    _warn_if_plaintext("tcp://127.0.0.1:8786", None)
    _warn_if_plaintext("tcp://localhost:8786", None)
    _warn_if_plaintext("tls://10.1.2.3:8786", None)
    assert not caplog.records
    _warn_if_plaintext("tcp://10.1.2.3:8786", None)
    _warn_if_plaintext("10.1.2.3:8786", None)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "10.1.2.3" in warnings[0] and "TLS" in warnings[0]


# -- 9. async tasks without an app context ---------------------------------------------


async def async_answer(value: int) -> int:
    return value * 2


def test_thread_async_task_is_awaited_without_app_context(
    make_thread_executor: Callable[..., Executor],
) -> None:
    app = create_app()
    executor = make_thread_executor(app, EXECUTOR_PUSH_APP_CONTEXT=False)
    assert executor.submit(async_answer, 21).result(timeout=TIMEOUT) == 42
