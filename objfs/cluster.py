"""What the members of a cluster share: the secret, request signatures, and the member list.

Trust. A cluster is the set of daemons (and its master) that hold one secret, read from
``--cluster-secret-file``. Every peer and master request carries an HMAC-SHA256 over the
method, the raw path with its query, a timestamp and the SHA-256 of the body, under that
secret (headers ``X-Objfs-Date`` and ``X-Objfs-Signature``). A request without a signature,
with a wrong one, or with a timestamp more than ``MAX_SKEW_S`` away from the receiver's clock
is refused with 401 before any handler runs; the comparison is constant-time
(``hmac.compare_digest``) and a missing signature is compared too, so timing tells nothing.
The secret file must not be readable by other users: a daemon refuses to start otherwise.
Signatures authenticate, they do not encrypt: peer traffic is plain HTTP on the cluster's
network, like the bytes the origin serves over http.

Membership. ``Membership`` is the one small interface the peer cache (and the preload
planner) sees: the current ``Ring`` and a way to hear about changes. ``StaticMembership``
serves the ``--peers`` list; the master's registration (``objfs.master``) is the other kind.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

from objfs.cache.ring import DEFAULT_EXTENT_PAGES, Ring
from objfs.errors import ConfigError

DATE_HEADER = "X-Objfs-Date"
SIGNATURE_HEADER = "X-Objfs-Signature"
MAX_SKEW_S = 300.0
MIN_SECRET_BYTES = 16
_EMPTY_BODY_SHA256 = hashlib.sha256(b"").hexdigest()


def load_cluster_secret(path: str | os.PathLike[str], flag: str = "--cluster-secret-file") -> bytes:
    """The secret in ``path`` (surrounding whitespace stripped). Raises a one-line
    ``ConfigError`` if the file is missing, unreadable, readable by other users, or shorter
    than ``MIN_SECRET_BYTES``."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{flag} {path}: not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(f"{flag} {path} is accessible by other users (mode "
                              f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}")
        data = os.read(fd, 65536).strip()
    finally:
        os.close(fd)
    if len(data) < MIN_SECRET_BYTES:
        raise ConfigError(f"{flag} {path}: the secret must be at least {MIN_SECRET_BYTES} "
                          f"bytes (e.g. head -c 32 /dev/urandom | base64 > {path})")
    return data


def _signature(secret: bytes, method: str, raw_path: str, timestamp: str,
               body_sha256: str) -> str:
    message = f"{method.upper()}\n{raw_path}\n{timestamp}\n{body_sha256}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secret: bytes, method: str, raw_path: str, body: bytes = b"",
         now: float | None = None) -> dict[str, str]:
    """Headers that authenticate a request. ``raw_path`` is the path and query exactly as
    sent on the wire (percent-encoded), e.g. ``/v1/pages?key=a%20b&first=0``."""
    timestamp = str(int(time.time() if now is None else now))
    digest = hashlib.sha256(body).hexdigest() if body else _EMPTY_BODY_SHA256
    return {DATE_HEADER: timestamp,
            SIGNATURE_HEADER: _signature(secret, method, raw_path, timestamp, digest)}


def verify(secret: bytes, method: str, raw_path: str, headers: Mapping[str, str],
           body: bytes = b"", now: float | None = None,
           max_skew_s: float = MAX_SKEW_S) -> str | None:
    """None if the request is authentic, else why not (for the log; never sent back in
    detail). Constant-time in the signature."""
    timestamp = headers.get(DATE_HEADER, "")
    given = headers.get(SIGNATURE_HEADER, "")
    digest = hashlib.sha256(body).hexdigest() if body else _EMPTY_BODY_SHA256
    expected = _signature(secret, method, raw_path, timestamp, digest)
    # Compared even when absent, so a missing signature takes as long as a wrong one.
    matches = hmac.compare_digest(expected.encode(), given.encode())
    if not given or not timestamp:
        return "no signature"
    if not matches:
        return "wrong signature"
    try:
        skew = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return "malformed timestamp"
    if skew > max_skew_s:
        return f"stale signature ({skew:.0f}s off)"
    return None


def auth_middleware(secret: bytes, *, clock: Callable[[], float] = time.time,
                    on_refused: Callable[[str, str], None] | None = None):
    """An aiohttp middleware that answers 401 (no data) to any request ``verify`` refuses.
    ``on_refused(remote, reason)`` is called for each refusal (logging, counting)."""
    from aiohttp import web

    @web.middleware
    async def middleware(request: web.Request, handler):  # type: ignore[no-untyped-def]
        body = await request.read() if request.body_exists else b""
        reason = verify(secret, request.method, request.raw_path, request.headers, body,
                        now=clock())
        if reason is not None:
            if on_refused is not None:
                on_refused(request.remote or "?", reason)
            return web.json_response({"error": "unauthorized"}, status=401)
        return await handler(request)

    return middleware


class Membership(Protocol):
    """Who is in the cluster, as this host sees it now."""

    @property
    def self_id(self) -> str: ...

    def ring(self) -> Ring:
        """The current member list and owner function (immutable; replaced on change)."""
        ...

    def subscribe(self, callback: Callable[[Ring], None]) -> None:
        """Call ``callback(new_ring)`` after every change (from whichever thread made it)."""
        ...


class StaticMembership:
    """The ``--peers`` list: fixed for the life of the daemon (plus this host)."""

    def __init__(self, self_id: str, peers: Iterable[str],
                 extent_pages: int = DEFAULT_EXTENT_PAGES) -> None:
        self._ring = Ring.of(peers, self_id, extent_pages)

    @property
    def self_id(self) -> str:
        return self._ring.self_id

    def ring(self) -> Ring:
        return self._ring

    def subscribe(self, callback: Callable[[Ring], None]) -> None:
        return None  # never changes


class MutableMembership:
    """A member list replaced from outside (the master's answers): keeps the last list when
    updates stop, so a master that is down does not stop reads. Thread-safe."""

    def __init__(self, self_id: str, extent_pages: int = DEFAULT_EXTENT_PAGES,
                 initial: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._ring = Ring.of(initial, self_id, extent_pages)  # guarded by _lock
        self._callbacks: list[Callable[[Ring], None]] = []     # guarded by _lock

    @property
    def self_id(self) -> str:
        return self._ring.self_id

    def ring(self) -> Ring:
        return self._ring

    def subscribe(self, callback: Callable[[Ring], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def update(self, members: Iterable[str]) -> bool:
        """Replace the member list; True (and callbacks run) if it changed."""
        with self._lock:
            ring = Ring.of(members, self._ring.self_id, self._ring.extent_pages)
            if ring.members == self._ring.members:
                return False
            self._ring = ring
            callbacks = list(self._callbacks)
        for callback in callbacks:
            callback(ring)
        return True
