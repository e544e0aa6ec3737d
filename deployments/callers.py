"""Who is asking: the client's address (behind a trusted load balancer, the last entry it appended to a header) and
the name of the API key it sent (``KeyRing``), for every transport (HTTP, gRPC).

Keys are known by their SHA-256 digests only: the ingress's ``user_config`` (``keys.named``), which ``serve config``
and the dashboard show, holds names and digests; a file (``keys.file``, e.g. a mounted Kubernetes secret) may hold
more in the same form, and is read again on every reconfigure and when its modification time changes (checked at
most every ``FILE_CHECK_S``). The key of ``api_key`` / ``VTP_API_KEY`` is the one named ``default``; an app's
``args`` change only with a restart, so that one rotates with a restart. Every valid digest is compared with the
request's in constant time (all of them, every time), and a key is never logged: logs, metrics and ``/v1/model``
show its name.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from .settings import AppSettings, Budget, IngressConfig, NamedKey, check_key_name

__all__ = ["DEFAULT_KEY_NAME", "FILE_CHECK_S", "Caller", "KeyRing", "client_address", "grpc_client_address"]

log = logging.getLogger("ray.serve")

#: The name of the key given as ``api_key`` (``VTP_API_KEY``).
DEFAULT_KEY_NAME = "default"
#: How often the key file's modification time is looked at (a stat call) while requests come.
FILE_CHECK_S = 5.0

_NAMED_KEYS = TypeAdapter(dict[str, NamedKey])


@dataclass(frozen=True)
class Caller:
    """One request's client: its address and, when it sent a valid API key, the key's name."""

    client: str
    key: str | None = None  # the key's name; None without a valid key

    @property
    def identity(self) -> str:
        """Whose budget a request is charged to: the key's name when there is one, else the address."""
        return f"key:{self.key}" if self.key is not None else f"address:{self.client}"


class KeyRing:
    """The valid API keys of an ingress replica, by name: ``api_key`` (named ``default``), ``keys.named`` and the
    keys of ``keys.file``. Built again on every reconfigure."""

    def __init__(self, settings: AppSettings, config: IngressConfig, clock: Any = time.monotonic) -> None:
        keys = dict(config.keys.named)
        if settings.api_key is not None:
            if DEFAULT_KEY_NAME in keys:
                raise ValueError(f"keys.named.{DEFAULT_KEY_NAME}: the name of api_key (VTP_API_KEY); pick another")
            digest = hashlib.sha256(settings.api_key.get_secret_value().encode()).hexdigest()
            keys[DEFAULT_KEY_NAME] = NamedKey(sha256=[digest])
        self._configured = keys
        self._file = Path(config.keys.file) if config.keys.file else None
        self._clock = clock
        self._checked_at = clock()
        self._file_stamp: tuple[int, int] | None = None
        self._keys = self._configured
        if self._file is not None:
            self._file_stamp, from_file = _read_stamped(self._file)
            self._keys = self._with_file(from_file)

    @property
    def required(self) -> bool:
        """Whether any key is configured (then every route but health and the page needs one)."""
        return bool(self._keys)

    @property
    def names(self) -> list[str]:
        return sorted(self._keys)

    def budget(self, name: str, kind: str) -> Budget | None:
        """Key ``name``'s own budget for ``kind`` routes (None: the default)."""
        key = self._keys.get(name)
        return getattr(key, kind) if key is not None else None

    def identify(self, authorization: str | None) -> str | None:
        """The name of the key in ``authorization`` (``Bearer <key>``, a header or gRPC metadata value), else None.

        The request's digest is compared with every valid one in constant time, whatever matches."""
        self._maybe_reload()
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hashlib.sha256(token.strip().encode()).hexdigest().encode()
        found = None
        for name, key in self._keys.items():
            for valid in key.sha256:
                if hmac.compare_digest(digest, valid.encode()):
                    found = name
        return found

    def _with_file(self, from_file: dict[str, NamedKey]) -> dict[str, NamedKey]:
        clash = sorted(set(from_file) & set(self._configured))
        if clash:
            raise ValueError(f"keys.file names keys that keys.named (or api_key) names too: {clash}")
        return {**self._configured, **from_file}

    def _maybe_reload(self) -> None:
        """Read the key file again when its modification time or size changed (a rotated secret)."""
        if self._file is None or self._clock() - self._checked_at < FILE_CHECK_S:
            return
        self._checked_at = self._clock()
        try:
            if _stamp(self._file) == self._file_stamp:
                return
            stamp, from_file = _read_stamped(self._file)
            keys = self._with_file(from_file)
        except (OSError, ValueError) as e:  # keep the keys in force; the operator sees why in the logs
            log.error("keys.file %s: not reloaded, the keys in force stay: %s", self._file, e)
            return
        self._keys, self._file_stamp = keys, stamp
        log.info("keys.file %s reloaded: keys %s", self._file, self.names)


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def _read_stamped(path: Path) -> tuple[tuple[int, int] | None, dict[str, NamedKey]]:
    """The file's stamp (taken before reading: a change while reading is seen at the next check) and its keys."""
    try:
        stamp = _stamp(path)
    except OSError as e:
        raise ValueError(f"keys.file {str(path)!r} cannot be read: {e}") from None
    return stamp, read_key_file(path)


def read_key_file(path: Path) -> dict[str, NamedKey]:
    """The named keys of a YAML or JSON file in the form of ``keys.named`` (name -> sha256 and budgets)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"keys.file {str(path)!r} cannot be read: {e}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"keys.file {str(path)!r}: a mapping of key names, got {type(data).__name__}")
    try:
        keys = _NAMED_KEYS.validate_python(data)
    except ValidationError as e:
        raise ValueError(f"keys.file {str(path)!r}: {e}") from None
    for name in keys:
        check_key_name(name)
    return keys


def client_address(scope: Mapping[str, Any], header: str | None) -> str:
    """An HTTP request's client address: the last entry of ``header`` (what a trusted load balancer appended),
    else the peer."""
    if header:
        name = header.lower().encode("latin-1")
        values = [value for key, value in scope.get("headers", ()) if key.lower() == name]
        if values and values[-1].strip():
            return values[-1].decode("latin-1").rsplit(",", 1)[-1].strip()
    client = scope.get("client")
    return client[0] if client else "unknown"


def grpc_client_address(peer: str, metadata: Mapping[str, str], header: str | None) -> str:
    """A gRPC request's client address: the last entry of metadata ``header`` behind a load balancer, else the
    peer (``ipv4:10.0.0.9:5000``, ``ipv6:[::1]:5000``)."""
    if header and (value := metadata.get(header.lower(), "").strip()):
        return value.rsplit(",", 1)[-1].strip()
    for prefix in ("ipv4:", "ipv6:"):
        if peer.startswith(prefix):
            host = peer[len(prefix) :].rsplit(":", 1)[0]
            return host.replace("%5B", "[").replace("%5D", "]").strip("[]")
    return peer or "unknown"
