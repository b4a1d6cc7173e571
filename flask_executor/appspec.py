"""The app a process or cluster worker runs its tasks in.

In the web process, :func:`app_spec` describes an app (the picklable subset
of its config, its routes, template and static folders, request class, URL
converters) as a versioned :class:`AppSpec`; workers receive it only when the
version changes. In the worker, :func:`restore_app` builds the app once per
process (from ``EXECUTOR_APP_FACTORY``, from the live app a ``fork`` copied,
or as a stand-in) and applies the spec's config on top. The per-task context
(request, ``g``, session) is :mod:`flask_executor.snapshot`'s.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import logging
import os
import re
import sys
import threading
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

from flask import Flask
from werkzeug.routing import Rule

from .errors import ConfigKeyNotCopiedError
from .serialize import dumps, import_object, type_name
from .snapshot import _NotCopyable, _pickle_check

__all__ = ["AppSpec", "ConfigRules", "app_spec", "app_token", "restore_app"]

logger = logging.getLogger("flask_executor")


class AppSpec:
    """How a worker builds its Flask app: from ``factory``, from the live app
    it inherited by ``fork``, or as a stand-in with the same routes and
    templates. ``config`` is applied on top in each case.

    A plain class, as is every class here (see
    :class:`~flask_executor.backends.BackendOptions`): the fork server
    imports this module before it starts the first worker."""

    def __init__(
        self,
        token: str,
        version: str,
        factory: str | None,
        import_name: str,
        root_path: str | None,
        template_folder: str | None,
        static_folder: str | None,
        static_url_path: str | None,
        instance_path: str,
        request_class: type | None,
        converters: dict[str, Any],
        host_matching: bool,
        subdomain_matching: bool,
        rules: list[dict[str, Any]],
        config: dict[str, Any],
        omitted: dict[str, str] | None = None,
    ) -> None:
        self.token = token
        self.version = version
        self.factory = factory
        self.import_name = import_name
        self.root_path = root_path
        self.template_folder = template_folder
        self.static_folder = static_folder
        self.static_url_path = static_url_path
        self.instance_path = instance_path
        self.request_class = request_class
        self.converters = converters
        self.host_matching = host_matching
        self.subdomain_matching = subdomain_matching
        self.rules = rules
        self.config = config
        #: Keys left out of ``config``, with the message a task reading one gets.
        self.omitted: dict[str, str] = {} if omitted is None else omitted


#: Never sent to any worker, by any executor: TLS key material.
ALWAYS_EXCLUDED = ("*EXECUTOR_DASK_SECURITY",)
#: Kept from Dask workers (possibly other machines) unless
#: ``EXECUTOR_SNAPSHOT_CONFIG_INCLUDE`` opts them in; string values that are
#: URLs with a password (``postgresql://user:password@host/db``) too.
SECRET_PATTERNS = (
    "SECRET_KEY",
    "SECRET_KEY_FALLBACKS",
    "*SECRET*",
    "*PASSWORD*",
    "*_TOKEN",
    "*_API_KEY",
    "*_PRIVATE_KEY",
    "*CREDENTIALS*",
)
#: A pattern, not compiled here: only Dask executors match it, and compiling it
#: would cost a quarter of a millisecond in every process that imports this
#: module, the fork server among them (``re`` caches it at its first use).
_URL_WITH_PASSWORD = r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s:]*:[^/?#@\s]+@"


def _matches(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def _patterns(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """A config list of keys or patterns: a sequence, or a comma/space separated string."""
    if not value:
        return ()
    if isinstance(value, str):
        return tuple(part for part in re.split(r"[\s,]+", value) if part)
    return tuple(value)


class ConfigRules:
    """Which config keys one executor sends to its workers; equal rules are
    one key of the spec cache.

    :param exclude: ``EXECUTOR_SNAPSHOT_CONFIG_EXCLUDE``: never sent.
    :param include: ``EXECUTOR_SNAPSHOT_CONFIG_INCLUDE``: secrets sent anyway.
    :param secrets: send keys that look like secrets (process workers: same
        user, same machine); ``False`` for Dask workers.
    :param prefix: the executor's config prefix, for messages.
    """

    __slots__ = ("exclude", "include", "secrets", "prefix")

    def __init__(
        self,
        exclude: tuple[str, ...] = (),
        include: tuple[str, ...] = (),
        secrets: bool = True,
        prefix: str = "",
    ) -> None:
        self.exclude = exclude
        self.include = include
        self.secrets = secrets
        self.prefix = prefix

    def _fields(self) -> tuple[tuple[str, ...], tuple[str, ...], bool, str]:
        return self.exclude, self.include, self.secrets, self.prefix

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConfigRules):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    @classmethod
    def from_config(
        cls,
        exclude: str | Sequence[str] | None,
        include: str | Sequence[str] | None,
        *,
        secrets: bool,
        prefix: str = "",
    ) -> ConfigRules:
        return cls(_patterns(exclude), _patterns(include), secrets, prefix)

    def left_out(self, key: str, value: Any) -> str | None:
        """Why ``key`` is not sent, or ``None`` if it is."""
        if _matches(key, ALWAYS_EXCLUDED):
            return f"config[{key!r}] holds TLS key material and is never sent to workers"
        if self.exclude and _matches(key, self.exclude):
            return (
                f"config[{key!r}] matches {self.prefix}EXECUTOR_SNAPSHOT_CONFIG_EXCLUDE,"
                " so it is not sent to workers; remove it from that list, or set it in"
                " the worker's EXECUTOR_APP_FACTORY app"
            )
        if self.secrets or (self.include and _matches(key, self.include)):
            return None
        if _matches(key, SECRET_PATTERNS) or (
            isinstance(value, str) and re.match(_URL_WITH_PASSWORD, value)
        ):
            return (
                f"config[{key!r}] looks like a secret, and secrets are not sent to Dask"
                f" workers; add it to {self.prefix}EXECUTOR_SNAPSHOT_CONFIG_INCLUDE to"
                " send it, or set it in the worker's EXECUTOR_APP_FACTORY app"
            )
        return None


class _SpecCache:
    __slots__ = ("config", "view_count", "version", "payload", "warned")

    def __init__(
        self, config: dict[str, Any], view_count: int, version: str, payload: bytes,
        warned: set[str],
    ) -> None:  # fmt: skip
        self.config = config
        self.view_count = view_count
        self.version = version
        self.payload = payload
        self.warned = warned


#: Per app, one spec per executor (its rules and factory) and way of pickling.
_spec_caches: weakref.WeakKeyDictionary[
    Flask, dict[tuple[ConfigRules, str | None, bool], _SpecCache]
] = weakref.WeakKeyDictionary()
_spec_lock = threading.Lock()
#: Live apps by token, so that workers forked from this process find theirs.
_live_apps: weakref.WeakValueDictionary[str, Flask] = weakref.WeakValueDictionary()
_app_tokens: weakref.WeakKeyDictionary[Flask, str] = weakref.WeakKeyDictionary()


def _new_lock_in_child() -> None:
    """In a forked child, a free ``_spec_lock``: another thread (a request
    submitting to a process pool) may have held it at the fork, and a lock
    held at a fork stays held in the child for good."""
    global _spec_lock
    _spec_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


def app_token(app: Flask) -> str:
    """A stable identifier for ``app`` in this process."""
    with _spec_lock:
        token = _app_tokens.get(app)
        if token is None:
            token = uuid.uuid4().hex
            _app_tokens[app] = token
            _live_apps[token] = app
        return token


def app_spec(
    app: Flask, rules: ConfigRules, factory: str | None, by_value_main: bool = True
) -> tuple[str, bytes]:
    """``(version, pickled AppSpec)`` for ``app``'s current config and routes,
    as one executor (its ``rules`` and ``factory``) sends them, pickled as
    its backend pickles calls (``by_value_main``, see
    :func:`~flask_executor.serialize.dumps`): by reference for process
    workers, so that the standard pickler does it and cloudpickle is not
    needed for a config of plain values.

    Cached per app and executor: as long as the config compares equal key by
    key and no view was added, the same version and bytes are returned without
    pickling anything, so the per-task cost does not grow with the size of the
    config.
    """
    config = app.config
    key = (rules, factory, by_value_main)
    with _spec_lock:
        cache = _spec_caches.get(app, {}).get(key)
    try:
        if cache is not None and cache.view_count == len(app.view_functions):
            if config == cache.config:
                return cache.version, cache.payload
    except Exception:  # values whose == is not a bool (arrays): rebuild
        pass
    warned = cache.warned if cache is not None else set()
    spec = _app_reduce(app, rules, factory, warned)
    payload = dumps(spec, by_value_main=by_value_main)
    new = _SpecCache(dict(config), len(app.view_functions), spec.version, payload, warned)
    with _spec_lock:
        _spec_caches.setdefault(app, {})[key] = new
    return new.version, new.payload


def _config_reduce(
    app: Flask, rules: ConfigRules, warned: set[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    kept: dict[str, Any] = {}
    omitted: dict[str, str] = {}
    for key, value in app.config.items():
        reason = rules.left_out(key, value)
        if reason is not None:
            omitted[key] = reason
            continue
        try:
            kept[key] = _pickle_check(value)
        except _NotCopyable as exc:
            omitted[key] = (
                f"config[{key!r}] ({exc}) cannot be pickled, so it is not sent to workers;"
                " set it in the worker's EXECUTOR_APP_FACTORY app"
            )
            if key not in warned:
                warned.add(key)
                logger.warning(
                    "config[%r] (%s) cannot be pickled and is left out of process"
                    " and cluster tasks",
                    key,
                    exc,
                )
    return kept, omitted


def _app_reduce(
    app: Flask, config_rules: ConfigRules, factory: str | None, warned: set[str]
) -> AppSpec:
    url_map = app.url_map
    rules = []
    for rule in url_map.iter_rules():
        if rule.endpoint == "static" and app.has_static_folder:
            continue
        rules.append(
            {
                "string": rule.rule,
                "endpoint": rule.endpoint,
                "methods": rule.methods,
                "defaults": rule.defaults,
                "subdomain": rule.subdomain,
                "host": rule.host,
                "strict_slashes": rule.strict_slashes,
                "merge_slashes": rule.merge_slashes,
                "build_only": rule.build_only,
                "redirect_to": rule.redirect_to if isinstance(rule.redirect_to, str) else None,
                "websocket": rule.websocket,
            }
        )
    defaults = type(url_map).default_converters
    config, omitted = _config_reduce(app, config_rules, warned)
    return AppSpec(
        token=app_token(app),
        version=uuid.uuid4().hex,
        factory=factory,
        import_name=app.import_name,
        root_path=app.root_path,
        template_folder=app.template_folder,  # type: ignore[arg-type]
        static_folder=app.static_folder if app.has_static_folder else None,
        static_url_path=app.static_url_path,
        instance_path=app.instance_path,
        request_class=app.request_class if app.request_class is not Flask.request_class else None,
        converters={k: v for k, v in url_map.converters.items() if defaults.get(k) is not v},
        host_matching=url_map.host_matching,
        subdomain_matching=app.subdomain_matching,
        rules=rules,
        config=config,
        omitted=omitted,
    )


class _WorkerApp:
    __slots__ = ("app", "base_config", "version")

    def __init__(self, app: Flask, base_config: dict[str, Any]) -> None:
        self.app = app
        #: The config the app had before any snapshot was applied to it.
        self.base_config = base_config
        self.version = ""


#: The apps this worker process has built.
_worker_apps: dict[str, _WorkerApp] = {}


def restore_app(spec: AppSpec) -> Flask:
    """The worker's app for ``spec``, built once per process.

    Whenever the config version changes, the app's config is reset to what it
    was when built (the factory's config; Flask's defaults for a stand-in or a
    forked copy of the live app) and the snapshot's config applied on top, so
    keys removed or excluded in the web process are gone here too.
    """
    key = f"factory:{spec.factory}" if spec.factory else f"app:{spec.token}"
    entry = _worker_apps.get(key)
    if entry is None:
        if spec.factory:
            app = _factory_restore(spec.factory)
            base = dict(app.config)
        else:
            app = _live_apps.get(spec.token) or _standin_restore(spec)
            base = dict(app.default_config)
        entry = _worker_apps[key] = _WorkerApp(app, base)
    if entry.version != spec.version:
        config = entry.app.config
        config.clear()
        config.update(entry.base_config)
        config.update(spec.config)
        if spec.omitted or isinstance(config, _OmittingConfig):
            _omitted_config_restore(entry.app, spec, from_factory=bool(spec.factory))
        entry.version = spec.version
    return entry.app


def _omitted_config_restore(app: Flask, spec: AppSpec, from_factory: bool) -> None:
    """Make reading a key the web process left out raise
    :exc:`~flask_executor.ConfigKeyNotCopiedError` naming the setting to
    change (``config.get(key)`` still returns its default). A factory app's own
    value is the worker's and stays; a stand-in's (Flask's defaults, such as
    ``SECRET_KEY = None``) is removed, so the task gets the message rather
    than a silent ``None``."""
    config = app.config
    if not from_factory:
        for key in spec.omitted:
            config.pop(key, None)
    cls = type(config)
    if not issubclass(cls, _OmittingConfig):
        config.__class__ = _omitting_config_class(cls)
    config._flask_executor_omitted = spec.omitted  # type: ignore[attr-defined]


class _OmittingConfig(dict):  # type: ignore[type-arg]
    """Marker base of the config classes :func:`_omitting_config_class` makes."""


_omitting_config_classes: dict[type, type] = {}


def _omitting_config_class(base: type) -> type:
    cls = _omitting_config_classes.get(base)
    if cls is None:

        def __missing__(self: Any, key: str) -> Any:
            reason = getattr(self, "_flask_executor_omitted", {}).get(key)
            if reason is not None:
                raise ConfigKeyNotCopiedError(reason)
            raise KeyError(key)

        cls = type(base.__name__, (base, _OmittingConfig), {"__missing__": __missing__})
        _omitting_config_classes[base] = cls
    return cls


def _factory_restore(factory: str) -> Flask:
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"EXECUTOR_APP_FACTORY must look like 'package.module:create_app', got {factory!r}"
        )
    _alias_main(module_name)
    target = import_object(module_name, attr)
    app = target() if not isinstance(target, Flask) else target
    if not isinstance(app, Flask):
        raise TypeError(
            f"EXECUTOR_APP_FACTORY {factory!r} returned {type_name(app)}, not a Flask app"
        )
    return app


def _alias_main(module_name: str) -> None:
    """When the factory lives in the script the web process runs
    (``python app.py`` with ``EXECUTOR_APP_FACTORY = 'app:create_app'``),
    let the worker use the copy of it already loaded as ``__main__``:
    importing it again would create a second ``db = SQLAlchemy()`` that the
    task's functions never see."""
    if module_name in sys.modules:
        return
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return
    if main_file and spec is not None and spec.origin:
        if os.path.realpath(spec.origin) == os.path.realpath(main_file):
            sys.modules[module_name] = sys.modules["__main__"]


def _standin_restore(spec: AppSpec) -> Flask:
    app = Flask(
        spec.import_name,
        root_path=spec.root_path,
        template_folder=spec.template_folder,
        static_folder=spec.static_folder,
        static_url_path=spec.static_url_path,
        instance_path=spec.instance_path,
        host_matching=spec.host_matching,
        subdomain_matching=spec.subdomain_matching,
    )
    if spec.request_class is not None:
        app.request_class = spec.request_class
    app.url_map.converters.update(spec.converters)
    for rule in spec.rules:
        options = dict(rule)
        app.url_map.add(Rule(options.pop("string"), **options))
    return app
