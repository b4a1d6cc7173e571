"""Every configuration key the executor reads, declared once.

Each :class:`Setting` is one row: the key (without the executor's name prefix),
its default, the parser that turns what the app configured into the value the
executor uses (raising :exc:`ValueError` that names the prefixed key), and a
one-line meaning. :func:`read` puts every default into ``app.config`` with
``setdefault`` and returns the parsed values; ``docs/config.rst`` documents each
key (a test checks that none is missing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["EXECUTOR_TYPES", "SETTINGS", "START_METHODS", "Setting", "read", "str2bool"]

EXECUTOR_TYPES = ("thread", "process", "dask", "immediate")
START_METHODS = ("fork", "forkserver", "spawn")
DEFAULT_MAX_BODY = 1024 * 1024
#: Inside gunicorn's default --graceful-timeout (30 s), with time to fail the rest.
DEFAULT_SHUTDOWN_TIMEOUT = 25.0

#: A parser: ``(value as configured, prefixed key) -> value the executor uses``.
Parser = Callable[[Any, str], Any]


def str2bool(value: Any) -> bool:
    """Config booleans: ``'False'``, ``'0'``, ``'no'``, ``'off'`` and ``''``
    are false, like ``False``, ``0`` and ``None``."""
    if isinstance(value, str):
        return value.strip().lower() not in ("false", "0", "no", "off", "n", "f", "")
    return bool(value)


def _flag(value: Any, key: str) -> bool:
    return str2bool(value)


def _as_is(value: Any, key: str) -> Any:
    return value


def _text(value: Any, key: str) -> Any:
    """Unset (``None`` or ``''``) is ``None``."""
    return value or None


def _number(value: Any, key: str, kind: type[float], what: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} = {value!r} is not {what}") from None


def _whole(value: Any, key: str) -> int | None:
    """A whole number of at least 1 (strings such as ``'5'`` welcome), or ``None``."""
    number = _number(value, key, int, "a whole number")
    if number is not None and number < 1:
        raise ValueError(f"{key} = {value!r} must be at least 1")
    return None if number is None else int(number)


def _seconds(value: Any, key: str) -> float | None:
    """A number of seconds above 0, or ``None``."""
    number = _number(value, key, float, "a number of seconds")
    if number is not None and number <= 0:
        raise ValueError(f"{key} = {value!r} must be more than 0")
    return number


def _one_of(choices: tuple[str, ...], what: str, optional: bool = False) -> Parser:
    def parse(value: Any, key: str) -> str | None:
        if optional and value is None:
            return None
        chosen = str(value).strip().lower()
        if chosen not in choices:
            raise ValueError(
                f"{key} = {value!r} is not {what}; choose one of {', '.join(map(repr, choices))}"
            )
        return chosen

    return parse


@dataclass(frozen=True)
class Setting:
    """One configuration key: ``name`` without the executor's prefix."""

    name: str
    default: Any
    parse: Parser
    meaning: str


SETTINGS: tuple[Setting, ...] = (
    Setting("EXECUTOR_TYPE", "thread", _one_of(EXECUTOR_TYPES, "a valid executor type"),
            "the backend: threads, processes, a Dask cluster, or in-line (tests)"),
    Setting("EXECUTOR_MAX_WORKERS", None, _whole, "pool size; None: the pool's own default"),
    Setting("EXECUTOR_FUTURES_MAX_LENGTH", None, _whole,
            "how many stored futures are kept (50 when unset); the oldest go first"),
    Setting("EXECUTOR_FUTURES_TTL", None, _seconds,
            "seconds a finished stored future is kept"),
    Setting("EXECUTOR_PROPAGATE_EXCEPTIONS", False, _flag,
            "log every failed task's exception through app.logger"),
    Setting("EXECUTOR_PUSH_APP_CONTEXT", True, _flag, "run each task in a Flask context"),
    Setting("EXECUTOR_START_METHOD", None,
            _one_of(START_METHODS, "a start method", optional=True),
            "process start method; None: forkserver where available, else spawn"),
    Setting("EXECUTOR_MAX_TASKS_PER_CHILD", None, _whole,
            "replace a process worker after this many tasks"),
    Setting("EXECUTOR_TASK_TIMEOUT", None, _seconds,
            "seconds a task may run before it fails with TaskTimeoutError"),
    Setting("EXECUTOR_SNAPSHOT_CONFIG_EXCLUDE", (), _as_is,
            "config keys or patterns never sent to process or Dask workers"),
    Setting("EXECUTOR_SNAPSHOT_CONFIG_INCLUDE", (), _as_is,
            "secret keys or patterns Dask workers get after all"),
    Setting("EXECUTOR_SNAPSHOT_MAX_BODY", DEFAULT_MAX_BODY, _whole,
            "request bodies larger than this many bytes are not copied into tasks"),
    Setting("EXECUTOR_APP_FACTORY", None, _text,
            "'pkg.module:create_app' that process and Dask workers build their app with"),
    Setting("EXECUTOR_DASK_ADDRESS", None, _as_is,
            "Dask scheduler address; None: an embedded LocalCluster"),
    Setting("EXECUTOR_DASK_SECURITY", None, _as_is,
            "a distributed.Security for TLS; never sent to workers"),
    Setting("EXECUTOR_STORE", "memory", _as_is,
            "where stored futures live: 'memory', 'sqlite:///path.db' or 'redis://...'"),
    Setting("EXECUTOR_STORE_NAMESPACE", None, _text,
            "keeps records apart in a shared store; default: app import name and executor"),
    Setting("EXECUTOR_WORKER_INIT", None, _text,
            "'pkg.module:function' run once in each new process or Dask worker"),
    Setting("EXECUTOR_SHUTDOWN_TIMEOUT", DEFAULT_SHUTDOWN_TIMEOUT, _seconds,
            "seconds shutdown() and interpreter exit wait for running tasks"),
    Setting("EXECUTOR_IMMEDIATE_PICKLE", False, _flag,
            "in 'immediate' mode, go through the process path (pickle, rebuild context)"),
)


def read(config: Any, prefix: str) -> Mapping[str, Any]:
    """Set every key's default in ``config`` (``setdefault``, with ``prefix``)
    and return the parsed values by unprefixed name.

    :raises ValueError: a value is invalid; the message names the prefixed key.
    """
    return {
        setting.name: setting.parse(
            config.setdefault(prefix + setting.name, setting.default), prefix + setting.name
        )
        for setting in SETTINGS
    }
