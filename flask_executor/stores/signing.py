"""What a shared store holds of a task's outcome, signed.

The web process unpickles a result or exception from a shared store only
after its HMAC-SHA256 signature checks out; the key is derived from the app's
``SECRET_KEY`` and the store namespace, so whoever can write to the store
(the database file, the Redis server) but does not know the secret cannot
make the web process unpickle anything. A row that fails the check raises
:exc:`~flask_executor.errors.StoreSignatureError`.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import traceback
from concurrent.futures import Future
from typing import Any

from ..errors import SerializationError, StoreSignatureError, TaskLostError
from ..serialize import type_name

__all__ = ["Signer", "decode_outcome", "encode_outcome"]

_CONTEXT = b"flask-executor store outcome v1\x00"
_DIGEST = hashlib.sha256().digest_size


class Signer:
    """Signs and checks blobs with a key derived from ``secret``."""

    def __init__(self, secret: str | bytes, namespace: str) -> None:
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        self._key = hmac.new(secret, _CONTEXT + namespace.encode("utf-8"), "sha256").digest()

    def sign(self, data: bytes) -> bytes:
        return hmac.new(self._key, data, "sha256").digest() + data

    def unsign(self, blob: bytes, what: str) -> bytes:
        mac, data = blob[:_DIGEST], blob[_DIGEST:]
        expected = hmac.new(self._key, data, "sha256").digest()
        if len(blob) < _DIGEST or not hmac.compare_digest(mac, expected):
            raise StoreSignatureError(
                f"{what}: the stored outcome failed its signature check and was not"
                " unpickled (written without this app's SECRET_KEY, or SECRET_KEY changed)"
            )
        return data


class _Unstorable:
    """Stands for a result that could not be pickled into the store."""

    def __init__(self, message: str) -> None:
        self.message = message


def encode_outcome(future: Future[Any], signer: Signer | None) -> dict[str, Any]:
    """The record fields for a finished ``future`` (``signer``: sign and keep
    the pickled outcome too, for a shared store)."""
    if future.cancelled():
        return {"state": "cancelled"}
    exc = future.exception()
    if exc is None:
        fields: dict[str, Any] = {"state": "finished"}
        payload: Any = ("ok", future.result())
    else:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        fields = {
            "state": "failed",
            "error_type": type_name(exc),
            "error_message": str(exc),
            "traceback": text,
        }
        payload = ("error", exc)
    if signer is not None:
        try:
            data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as error:
            what = "result" if exc is None else "exception"
            data = pickle.dumps(
                ("ok", _Unstorable(f"the task's {what} could not be pickled into the"
                                   f" store: {type_name(error)}: {error}"))
            )
        fields["outcome"] = signer.sign(data)
    return fields


def decode_outcome(
    state: str,
    outcome: bytes | None,
    error_type: str | None,
    error_message: str | None,
    tb: str | None,
    signer: Signer | None,
    what: str,
) -> tuple[Any, BaseException | None]:
    """``(result, exception)`` of a finished record (``what`` names it in errors)."""
    if error_type == type_name(TaskLostError(None)):
        return None, TaskLostError(error_message)
    if outcome is None or signer is None:
        if state == "failed":
            return None, RuntimeError(f"{error_type}: {error_message}")
        return None, SerializationError(f"{what}: no result was stored")
    data = signer.unsign(outcome, what)
    try:
        kind, value = pickle.loads(data)
    except Exception as error:  # e.g. a class this process cannot import
        if state == "failed":
            value = RuntimeError(f"{error_type}: {error_message}")
            kind = "error"
        else:
            return None, SerializationError(
                f"{what}: the stored result cannot be unpickled here:"
                f" {type_name(error)}: {error}"
            )
    if isinstance(value, _Unstorable):
        return None, SerializationError(f"{what}: {value.message}")
    if kind == "ok":
        return value, None
    if tb and isinstance(value, BaseException) and value.__cause__ is None:
        from ..backends._worker import RemoteTraceback

        value.__cause__ = RemoteTraceback(f'\n"""\n{tb}"""')
    return None, value
