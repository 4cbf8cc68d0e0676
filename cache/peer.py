"""The peer cache: the members of a cluster serve each other's page misses from their caches.

Why: on a training cluster every host reads the same model and dataset files. Each extent of
pages (``cache.ring``: 8 pages, one coalesced GET) has one **owner** among the members; a
host that misses a page another member owns asks that owner, which answers from its READY
pages or fetches the run from the origin itself (once, whoever asks), keeps it and answers.
So a cold file read by N hosts at once leaves the origin about once, not N times.

Wire protocol (HTTP/1.1 on ``--peer-listen``, aiohttp on the daemon's event loop, every
request signed with the cluster secret: ``objfs.cluster``; 401 and no data otherwise)::

    GET /v1/pages?bucket=B&key=K&etag=E&size=S&first=F&count=N[&priority=P][&from=ID]
        200  Content-Length = sum of (4096 + page length); the body is, for each page of
             [F, F+N), its page file as stored on disk: the 4 KiB header of
             ``cache.format`` (bucket, key, ETag, index, length, chunk checksums), then the
             page's bytes. The asker verifies every header and chunk before using it.
        400  malformed;  403  not under this daemon's bucket/prefix
        412  the version is gone at the origin;  502  the owner's own origin fetch failed
        503  busy (too many requests in progress, or the serve limit is > 1 s in debt),
             with Retry-After: the asker goes to the origin and waits that long
    POST /v1/pages/check?bucket=&key=&etag=&size=&index=
             an asker found page ``index`` corrupt: the owner re-verifies its copy and
             forgets it if it does not verify (so it stops serving bad bytes)
    GET /v1/peer/info   {"id", "bucket", "prefix", "members", "extent_pages"}

``priority`` (demand/readahead/preload) is the asker's; the owner fetches for it at that
priority. ``from`` is the asker's member id (signed with the query), used only to label
counters per peer.

**Owner side** (``PeerServer``): page-state work runs in a thread pool
(``PageCache.pages_for_peer``: nothing on the loop reads a page file or takes the cache lock,
which is held across LMDB commits). Missing pages are claimed in the cache's own
single-flight state and fetched from the origin only: an owner never forwards. A READY page
goes out zero-copy: uvloop has no ``loop.sendfile`` (aiohttp's FileResponse would read the
file in chunks), so after the response headers are flushed the body is written by a worker
thread with ``os.sendfile`` on a duplicate of the connection's socket descriptor, polling
for POLLOUT on EAGAIN (the loop does not write to that socket meanwhile; the duplicate keeps
the socket alive even if the loop closes its descriptor). Pages fetched for the request are
in memory: the same thread writes their header (``encode_header``) and bytes. Without a
socket descriptor the body is read in the pool and written through aiohttp.

**Asker side** (``PeerSource``, a cache source in front of the origin, ``cache.sources``):
one GET per run (runs never cross an extent, so they have one owner). Any failure is a
miss: refused, timed out, 4xx/5xx, short or garbled body, a checksum that does not match,
the connection dying mid-body. It is counted, logged once per episode per peer, and the
peer backs off (1 s doubling to 30 s) while runs go to the origin; a 503 is honoured for
its Retry-After without calling the peer broken; a 412 is the origin's answer, not the
peer's fault. Bytes are used only after every page verified.

Counters (``objfs stats --json``: totals; Prometheus: per peer, label ``peer``): asker side
``peer_requests_total``, ``peer_in_bytes`` (= ``read_peer_bytes``), ``peer_fallbacks_total``
(runs owned elsewhere that came from the origin), ``peer_failures_total``,
``peer_busy_total`` (503s received); owner side ``peer_served_requests_total``,
``peer_out_bytes`` (``peer_out_sendfile_bytes`` of them zero-copy),
``peer_owner_fetches_total`` (origin fetches for peers), ``peer_owner_fetch_failures_total``,
``peer_served_busy_total`` (503s sent), ``peer_auth_failures_total`` (401s, label: remote
address), ``peer_forbidden_total`` (403s).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import enum
import logging
import math
import os
import select
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import aiohttp
import yarl
from aiohttp import web

from objfs.cache.format import HEADER_SIZE, CorruptPage, decode_header, encode_header, \
    verify_chunks
from objfs.cache.limits import Priority, TokenBucket
from objfs.cache.pagecache import PageCache, ServedPage
from objfs.cache.pages import ObjectVersion
from objfs.cache.sources import SourceMiss
from objfs.cluster import Membership, auth_middleware, sign
from objfs.errors import ObjfsError, StaleObject
from objfs.metrics import Metrics

log = logging.getLogger(__name__)

PAGES_PATH = "/v1/pages"
CHECK_PATH = "/v1/pages/check"
INFO_PATH = "/v1/peer/info"
MAX_PAGES_PER_REQUEST = 64
_MAX_ID_CHARS = 300
_AUTH_WARN_INTERVAL_S = 60.0


@dataclasses.dataclass(frozen=True)
class PeerSettings:
    """Timeouts and limits of the peer cache (not flags: these defaults hold on a loaded
    2-core machine and fail over in seconds when a peer hangs)."""

    connect_timeout_s: float = 1.0
    read_timeout_s: float = 15.0     # to the first byte (the owner may fetch first) and between
    backoff_min_s: float = 1.0
    backoff_max_s: float = 30.0
    max_serving: int = 64            # requests in progress at an owner; beyond: 503
    busy_debt_s: float = 1.0         # serve-limit debt beyond which an owner answers 503
    send_stall_s: float = 30.0       # a receiver that takes nothing this long is dropped
    zero_copy: bool = True           # sendfile from a worker thread (else read + write)

    def __post_init__(self) -> None:
        if min(self.connect_timeout_s, self.read_timeout_s, self.backoff_min_s,
               self.send_stall_s) <= 0 or self.backoff_max_s < self.backoff_min_s:
            raise ValueError("peer timeouts and backoffs must be positive (min <= max)")
        if self.max_serving < 1:
            raise ValueError("max_serving must be >= 1")


def version_query(version: ObjectVersion) -> list[tuple[str, str]]:
    return [("bucket", version.bucket), ("key", version.key), ("etag", version.etag),
            ("size", str(version.size))]


def encode_query(pairs: list[tuple[str, str]]) -> str:
    """Percent-encode every value (spaces as %20, never '+'), so the signed raw path is
    exactly what the server receives and parses."""
    return "&".join(f"{k}={urllib.parse.quote(v, safe='')}" for k, v in pairs)


# ---- per-peer state ------------------------------------------------------------------------

class PeerState(enum.Enum):
    SELF = "self"
    UP = "up"
    BACKOFF = "backing off"   # failed: not asked until ``until``
    BUSY = "busy"             # said 503: not asked until its Retry-After passed


@dataclasses.dataclass
class PeerRecord:
    """What this host knows of one member. Loop-only."""

    id: str
    state: PeerState = PeerState.UP
    until: float = 0.0              # clock time the backoff/busy period ends
    backoff_s: float = 0.0
    episode_since: float = 0.0      # clock time the current backoff episode began
    failures: int = 0               # in the current episode
    last_error: str = ""
    last_error_wall: float | None = None
    in_bytes: int = 0               # page bytes received from it (verified)
    out_bytes: int = 0              # bytes served to it
    requests: int = 0               # requests sent to it
    served: int = 0                 # requests it sent us that we answered 200
    fallbacks: int = 0              # runs it owns that came from the origin
    busy: int = 0                   # 503s it sent us
    owner_fetches: int = 0          # origin fetches we did on its behalf


class PeerTracker:
    """Up/backing-off state and per-peer counters. Loop-only (no locks)."""

    def __init__(self, self_id: str, metrics: Metrics, settings: PeerSettings, *,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.self_id = self_id
        self._metrics = metrics
        self._settings = settings
        self._clock = clock
        self._wall = wall
        self._peers: dict[str, PeerRecord] = {}

    def record(self, peer: str) -> PeerRecord:
        rec = self._peers.get(peer)
        if rec is None:
            rec = self._peers[peer] = PeerRecord(peer)
        return rec

    def records(self) -> dict[str, PeerRecord]:
        return dict(self._peers)

    def count(self, peer: str, name: str, value: float = 1) -> None:
        """``name`` for the totals and per peer (Prometheus label ``peer``)."""
        self._metrics.inc(name, value)
        self._metrics.inc_labeled(name, (("peer", peer),), value)

    def usable(self, peer: str) -> bool:
        rec = self._peers.get(peer)
        return rec is None or rec.state is PeerState.UP or self._clock() >= rec.until

    def failed(self, peer: str, error: str, started: float) -> None:
        """A request to ``peer`` begun at ``started`` (clock) failed: back off. Requests
        that were in flight when the episode began do not lengthen it."""
        rec = self.record(peer)
        now = self._clock()
        rec.last_error = error
        rec.last_error_wall = self._wall()
        self.count(peer, "peer_failures_total")
        if rec.state is not PeerState.BACKOFF:
            rec.state = PeerState.BACKOFF
            rec.backoff_s = self._settings.backoff_min_s
            rec.episode_since = now
            rec.failures = 1
            rec.until = now + rec.backoff_s
            log.warning("peer %s failed (%s): reading its pages from the origin, asking it "
                        "again in %.0fs (logged once until it answers)", peer, error,
                        rec.backoff_s)
            return
        rec.failures += 1
        if started >= rec.until - rec.backoff_s:
            # Begun after the current backoff period began: a retry once it was over (one
            # in flight when the period began says nothing new). Wait longer.
            rec.backoff_s = min(self._settings.backoff_max_s, rec.backoff_s * 2)
            rec.until = now + rec.backoff_s
        log.debug("peer %s failed again (%s), backing off %.0fs", peer, error, rec.backoff_s)

    def busy(self, peer: str, retry_after_s: float) -> None:
        rec = self.record(peer)
        self.count(peer, "peer_busy_total")
        rec.busy += 1
        if rec.state is PeerState.BACKOFF:
            return  # already not asked; a busy answer is an answer, but not a good one
        rec.state = PeerState.BUSY
        rec.until = max(rec.until, self._clock() + retry_after_s)

    def succeeded(self, peer: str) -> None:
        rec = self.record(peer)
        if rec.state is PeerState.BACKOFF:
            log.info("peer %s answers again (after %d failed requests)", peer, rec.failures)
        rec.state = PeerState.UP
        rec.backoff_s = 0.0
        rec.failures = 0

    def describe(self, members: tuple[str, ...]) -> list[dict[str, Any]]:
        now = self._clock()
        out = []
        for member in sorted(set(members) | set(self._peers)):
            rec = self._peers.get(member) or PeerRecord(member)
            state = rec.state
            if member == self.self_id:
                state = PeerState.SELF
            elif state is not PeerState.UP and now >= rec.until:
                state = PeerState.UP  # its backoff is over: the next run asks it again
            out.append({
                "id": member, "member": member in members, "state": state.value,
                "retry_in_s": round(max(0.0, rec.until - now), 1)
                if state in (PeerState.BACKOFF, PeerState.BUSY) else 0.0,
                "last_error": rec.last_error,
                "last_error_age_s": None if rec.last_error_wall is None
                else round(self._wall() - rec.last_error_wall, 1),
                "in_bytes": rec.in_bytes, "out_bytes": rec.out_bytes,
                "requests": rec.requests, "served": rec.served,
                "fallbacks": rec.fallbacks, "busy": rec.busy,
                "owner_fetches": rec.owner_fetches,
            })
        return out


# ---- asker side ----------------------------------------------------------------------------

class _Busy(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"busy (503), retry after {retry_after_s:.0f}s")
        self.retry_after_s = retry_after_s


class _NotTheirFault(Exception):
    """An answer that is a miss but says nothing bad about the peer (412: the version is
    gone at the origin; the origin will tell the reader)."""


class _BadPage(Exception):
    def __init__(self, message: str, index: int) -> None:
        super().__init__(message)
        self.index = index


def _retry_after(value: str | None, default: float = 1.0) -> float:
    try:
        seconds = float(value) if value is not None else default
    except ValueError:
        return default
    return min(60.0, max(0.0, seconds)) if math.isfinite(seconds) else default


class PeerSource:
    """The owning peer, as a cache source in front of the origin (``cache.sources``).

    Runs on the event loop. ``applies`` is true for runs another member owns; ``fetch``
    raises ``SourceMiss`` (after counting and logging) for anything but verified bytes."""

    name = "peer"

    def __init__(self, membership: Membership, secret: bytes, tracker: PeerTracker,
                 metrics: Metrics, settings: PeerSettings = PeerSettings(), *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._membership = membership
        self._secret = secret
        self._tracker = tracker
        self._metrics = metrics
        self._settings = settings
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None  # loop only
        self._reports: set[asyncio.Task] = set()  # loop only: bad-page reports in flight

    def applies(self, version: ObjectVersion, pages: range) -> bool:
        ring = self._membership.ring()
        return not ring.alone and ring.owner(version, pages.start) != ring.self_id

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None,
                                            sock_connect=self._settings.connect_timeout_s,
                                            sock_read=self._settings.read_timeout_s)
            self._session = aiohttp.ClientSession(
                timeout=timeout, auto_decompress=False,
                connector=aiohttp.TCPConnector(limit=256, enable_cleanup_closed=True))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, version: ObjectVersion, pages: range,
                    priority: Priority = Priority.DEMAND) -> bytearray:
        ring = self._membership.ring()
        owner = ring.owner(version, pages.start)
        if owner == ring.self_id:
            raise SourceMiss("this host owns the run")
        rec = self._tracker.record(owner)
        if not self._tracker.usable(owner):
            self._fallback(owner, rec)
            raise SourceMiss(f"peer {owner} is {rec.state.value}")
        started = self._clock()
        rec.requests += 1
        self._tracker.count(owner, "peer_requests_total")
        try:
            data = await self._request(owner, ring.self_id, version, pages, priority)
        except _Busy as busy:
            self._tracker.busy(owner, busy.retry_after_s)
            self._fallback(owner, rec)
            raise SourceMiss(str(busy)) from None
        except _NotTheirFault as exc:
            self._fallback(owner, rec)
            raise SourceMiss(str(exc)) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of a peer is a miss
            if isinstance(exc, _BadPage):
                self._report_bad_page(owner, ring.self_id, version, exc.index)
            self._tracker.failed(owner, _describe(exc), started)
            self._fallback(owner, rec)
            raise SourceMiss(f"peer {owner}: {_describe(exc)}") from None
        self._tracker.succeeded(owner)
        rec.in_bytes += len(data)
        self._tracker.count(owner, "peer_in_bytes", len(data))
        return data

    def _fallback(self, owner: str, rec: PeerRecord) -> None:
        rec.fallbacks += 1
        self._tracker.count(owner, "peer_fallbacks_total")

    async def _request(self, owner: str, self_id: str, version: ObjectVersion, pages: range,
                       priority: Priority) -> bytearray:
        raw_path = PAGES_PATH + "?" + encode_query(
            [*version_query(version), ("first", str(pages.start)),
             ("count", str(len(pages))), ("priority", priority.name.lower()),
             ("from", self_id)])
        headers = sign(self._secret, "GET", raw_path)
        lengths = [version.page_length(i) for i in pages]
        expected = sum(HEADER_SIZE + n for n in lengths)
        session = await self._http()
        async with session.get(yarl.URL(f"http://{owner}{raw_path}", encoded=True),
                               headers=headers) as resp:
            if resp.status == 503:
                raise _Busy(_retry_after(resp.headers.get("Retry-After")))
            if resp.status == 412:
                raise _NotTheirFault("the version is gone at the origin (412)")
            if resp.status != 200:
                text = (await resp.content.read(300)).decode(errors="replace").strip()
                raise ObjfsError(f"HTTP {resp.status} {text}".strip())
            if resp.content_length != expected:
                raise ObjfsError(f"Content-Length {resp.content_length}, expected {expected}")
            out = bytearray(sum(lengths))
            view = memoryview(out)
            pos = 0
            for index, length in zip(pages, lengths):
                raw = await resp.content.readexactly(HEADER_SIZE)
                try:
                    header = decode_header(raw)
                except CorruptPage as exc:
                    raise _BadPage(f"page {index}: {exc}", index) from None
                if (header.index != index or header.length != length
                        or header.bucket != version.bucket or header.key != version.key
                        or header.etag != version.etag):
                    raise _BadPage(f"page {index}: the header names another page", index)
                target = view[pos:pos + length]
                await _read_into(resp.content, target)
                try:
                    verify_chunks(header, 0, target)
                except CorruptPage as exc:
                    raise _BadPage(f"page {index}: {exc}", index) from None
                pos += length
            return out

    def _report_bad_page(self, owner: str, self_id: str, version: ObjectVersion,
                         index: int) -> None:
        """Tell the owner its copy of a page did not verify (best effort, not awaited)."""
        async def report() -> None:
            raw_path = CHECK_PATH + "?" + encode_query(
                [*version_query(version), ("index", str(index)), ("from", self_id)])
            try:
                session = await self._http()
                async with session.post(yarl.URL(f"http://{owner}{raw_path}", encoded=True),
                                        headers=sign(self._secret, "POST", raw_path)) as resp:
                    await resp.read()
            except Exception as exc:  # noqa: BLE001 - best effort
                log.debug("could not report a bad page to %s: %s", owner, exc)

        task = asyncio.get_running_loop().create_task(report())
        self._reports.add(task)  # a strong reference until it is done
        task.add_done_callback(self._reports.discard)


async def _read_into(content: aiohttp.StreamReader, target: memoryview) -> None:
    """Fill ``target`` from the body; a body that ends first is an error."""
    pos = 0
    while pos < len(target):
        chunk = await content.read(len(target) - pos)
        if not chunk:
            raise ObjfsError(f"body ended after {pos} of {len(target)} bytes of a page")
        target[pos:pos + len(chunk)] = chunk
        pos += len(chunk)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, asyncio.IncompleteReadError):
        return f"body ended early ({len(exc.partial)} of {exc.expected} bytes)"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientError) and not isinstance(exc, aiohttp.ClientResponseError):
        return f"{type(exc).__name__}: {text}"
    return text


# ---- owner side ----------------------------------------------------------------------------

class _SendFailed(Exception):
    pass


class _ShortPageFile(_SendFailed):
    def __init__(self, index: int) -> None:
        super().__init__(f"page file of page {index} is shorter than the page")
        self.index = index


def _wait_writable(poller: select.poll, stall_s: float) -> None:
    if not poller.poll(int(stall_s * 1000)):
        raise _SendFailed(f"the receiver took nothing for {stall_s:.0f}s")


def _write_all(fd: int, data: memoryview, poller: select.poll, stall_s: float) -> None:
    pos = 0
    while pos < len(data):
        try:
            pos += os.write(fd, data[pos:])
        except BlockingIOError:
            _wait_writable(poller, stall_s)


def send_pages_blocking(fd: int, version: ObjectVersion, pages: list[ServedPage],
                        stall_s: float, give_back: Callable[[ServedPage], None]) -> int:
    """BLOCKS (runs in a worker thread). Write each page (header + data) to the socket
    ``fd`` (non-blocking; a duplicate this function closes): page files with
    ``os.sendfile``, in-memory pages with ``os.write``. Gives every page file back.
    Returns the bytes sent by sendfile; raises ``_SendFailed``/``OSError``."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    zero_copy = 0
    try:
        for page in pages:
            if page.file is not None:
                count = HEADER_SIZE + page.length
                offset = 0
                while offset < count:
                    try:
                        n = os.sendfile(fd, page.file.fd, offset, count - offset)
                    except BlockingIOError:
                        _wait_writable(poller, stall_s)
                        continue
                    if n == 0:
                        raise _ShortPageFile(page.index)
                    offset += n
                zero_copy += count
                give_back(page)
            else:
                assert page.data is not None
                header = encode_header(version.bucket, version.key, version.etag, page.index,
                                       page.data)
                _write_all(fd, memoryview(header), poller, stall_s)
                _write_all(fd, memoryview(page.data), poller, stall_s)
        return zero_copy
    finally:
        for page in pages:
            give_back(page)
        os.close(fd)


def read_pages_blocking(version: ObjectVersion, pages: list[ServedPage],
                        give_back: Callable[[ServedPage], None]) -> list[bytes]:
    """BLOCKS. The body as buffers, for when no socket descriptor can be had."""
    out: list[bytes] = []
    try:
        for page in pages:
            if page.file is not None:
                count = HEADER_SIZE + page.length
                data = os.pread(page.file.fd, count, 0)
                if len(data) != count:
                    raise _ShortPageFile(page.index)
                out.append(data)
                give_back(page)
            else:
                assert page.data is not None
                out.append(encode_header(version.bucket, version.key, version.etag,
                                         page.index, page.data))
                out.append(bytes(page.data))
        return out
    finally:
        for page in pages:
            give_back(page)


class PeerServer:
    """The owner side: an aiohttp app on the daemon's loop, behind ``auth_middleware``.
    ``_serving`` and the serve bucket are loop-only."""

    def __init__(self, cache: PageCache, *, bucket: str, prefix: str, secret: bytes,
                 listen: tuple[str, int], membership: Membership, tracker: PeerTracker,
                 metrics: Metrics, settings: PeerSettings = PeerSettings(),
                 serve_limit: TokenBucket | None = None) -> None:
        self._cache = cache
        self._bucket = bucket
        self._prefix = prefix
        self._secret = secret
        self.listen = listen
        self._membership = membership
        self._tracker = tracker
        self._metrics = metrics
        self._settings = settings
        self._serve_limit = serve_limit
        self._serving = 0
        self._runner: web.AppRunner | None = None
        # Page-state work and sending; at most max_serving requests use it at once.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            settings.max_serving + 2, thread_name_prefix="objfs-peer-serve")
        self._auth_warned: dict[str, float] = {}  # remote -> last warning (loop only)

    # ---- lifecycle (on the loop) -----------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[auth_middleware(self._secret,
                                                           on_refused=self._refused)])
        app.router.add_get(PAGES_PATH, self._pages)
        app.router.add_post(CHECK_PATH, self._check)
        app.router.add_get(INFO_PATH, self._info)
        # Handlers still waiting at shutdown (a fetch for a peer) get 2 s, not aiohttp's 60.
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=2.0)
        await self._runner.setup()
        host, port = self.listen
        try:
            await web.TCPSite(self._runner, host, port, reuse_address=True).start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise ObjfsError(f"--peer-listen {host}:{port}: {exc.strerror or exc}") from None
        log.info("peer cache: serving s3://%s/%s on %s:%d", self._bucket, self._prefix, host,
                 port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- handlers --------------------------------------------------------------------------

    def _refused(self, remote: str, reason: str) -> None:
        self._metrics.inc("peer_auth_failures_total")
        self._metrics.inc_labeled("peer_auth_failures_total", (("peer", remote),))
        now = time.monotonic()
        last = self._auth_warned.get(remote)
        if last is None or now - last >= _AUTH_WARN_INTERVAL_S:
            if len(self._auth_warned) > 1024:
                self._auth_warned.clear()
            self._auth_warned[remote] = now
            log.warning("peer cache: refused a request from %s: %s (logged at most once a "
                        "minute per address)", remote, reason)

    def _asker(self, query: Any) -> str:
        """The asker's member id for counters: one of the members, else 'other'."""
        asker = query.get("from", "")
        return asker if asker in self._membership.ring().members else "other"

    def _version(self, query: Any) -> ObjectVersion | web.Response:
        try:
            bucket, key, etag = query["bucket"], query["key"], query["etag"]
            size = int(query["size"])
        except (KeyError, ValueError):
            return _error(400, "bucket, key, etag and size are required")
        if size < 0 or not key or not etag:
            return _error(400, "bad size, key or etag")
        if bucket != self._bucket or not key.startswith(self._prefix):
            self._metrics.inc("peer_forbidden_total")
            return _error(403, "not under this member's bucket/prefix")
        return ObjectVersion(bucket, key, etag, size)

    async def _info(self, request: web.Request) -> web.Response:
        ring = self._membership.ring()
        return web.json_response({"id": ring.self_id, "bucket": self._bucket,
                                  "prefix": self._prefix, "members": list(ring.members),
                                  "extent_pages": ring.extent_pages})

    async def _check(self, request: web.Request) -> web.Response:
        version = self._version(request.query)
        if isinstance(version, web.Response):
            return version
        try:
            index = int(request.query["index"])
            version.page_length(index)
        except (KeyError, ValueError):
            return _error(400, "bad index")
        ok = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._cache.check_page, version, index)
        if not ok:
            log.warning("peer %s found page %d of %s corrupt here: forgotten, refetched on "
                        "next use", self._asker(request.query), index, version.key)
        return web.json_response({"ok": ok})

    def _busy(self) -> float | None:
        """Seconds to tell an asker to wait, or None if this owner can take the request."""
        if self._serving >= self._settings.max_serving:
            return 1.0
        if self._serve_limit is not None:
            debt = self._serve_limit.debt_s()
            if debt > self._settings.busy_debt_s:
                return debt
        return None

    async def _pages(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        version = self._version(query)
        if isinstance(version, web.Response):
            return version
        try:
            first, count = int(query["first"]), int(query["count"])
            priority = Priority.parse(query.get("priority", "demand"))
        except (KeyError, ValueError):
            return _error(400, "first and count are required")
        if not (first >= 0 and 1 <= count <= MAX_PAGES_PER_REQUEST
                and first + count <= version.page_count()):
            return _error(400, "pages out of range")
        asker = self._asker(query)
        wait = self._busy()
        if wait is not None:
            self._tracker.count(asker, "peer_served_busy_total")
            return web.json_response({"error": "busy"}, status=503,
                                     headers={"Retry-After": str(max(1, math.ceil(wait)))})
        self._serving += 1
        try:
            return await self._serve(request, version, range(first, first + count), priority,
                                     asker)
        finally:
            self._serving -= 1

    async def _serve(self, request: web.Request, version: ObjectVersion, run: range,
                     priority: Priority, asker: str) -> web.StreamResponse:
        rec = self._tracker.record(asker)
        try:
            served, fetches = await self._cache.pages_for_peer(version, run, priority,
                                                              self._pool)
        except StaleObject as exc:
            return _error(412, str(exc))
        except (ObjfsError, asyncio.TimeoutError) as exc:
            self._tracker.count(asker, "peer_owner_fetch_failures_total")
            log.info("peer cache: could not fetch %s pages %d-%d for %s: %s", version.key,
                     run.start, run.stop - 1, asker, _describe(exc))
            return _error(502, f"the owner's origin fetch failed: {_describe(exc)}")
        if fetches:
            rec.owner_fetches += fetches
            self._tracker.count(asker, "peer_owner_fetches_total", fetches)
        total = sum(HEADER_SIZE + page.length for page in served)
        response: web.StreamResponse | None = None
        handed = [False]  # True once a worker thread owns the page files (it gives them back)
        try:
            if self._serve_limit is not None:
                await self._serve_limit.take(total)
            response = web.StreamResponse(status=200,
                                          headers={"Content-Type": "application/octet-stream"})
            response.content_length = total
            await response.prepare(request)
            zero_copy = await self._send(request, response, version, served, handed)
        except (_SendFailed, OSError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if not handed[0]:
                for page in served:
                    self._cache.give_back(page)
            if isinstance(exc, _ShortPageFile):
                await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._cache.check_page, version, exc.index)
            log.info("peer cache: sending %s pages %d-%d to %s failed: %s", version.key,
                     run.start, run.stop - 1, asker, _describe(exc))
            if request.transport is not None:
                request.transport.abort()  # the asker sees a short body: a miss
            self._metrics.inc("peer_send_failures_total")
            return response if response is not None else _error(500, "send failed")
        except BaseException:  # cancelled: files not handed to a thread go back now
            if not handed[0]:
                for page in served:
                    self._cache.give_back(page)
            raise
        await response.write_eof()
        rec.served += 1
        rec.out_bytes += total
        self._tracker.count(asker, "peer_served_requests_total")
        self._tracker.count(asker, "peer_out_bytes", total)
        if zero_copy:
            self._metrics.inc("peer_out_sendfile_bytes", zero_copy)
        return response

    async def _send(self, request: web.Request, response: web.StreamResponse,
                    version: ObjectVersion, served: list[ServedPage],
                    handed: list[bool]) -> int:
        """Write the body; returns the bytes that went out zero-copy. Sets ``handed[0]``
        when a worker thread takes over the page files (from then on it gives them back,
        whatever happens to this coroutine)."""
        loop = asyncio.get_running_loop()
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or not self._settings.zero_copy:
            handed[0] = True
            buffers = await loop.run_in_executor(self._pool, read_pages_blocking, version,
                                                 served, self._cache.give_back)
            for buf in buffers:
                await response.write(buf)
            return 0
        # The headers went to the transport in prepare(); the thread may only write once
        # the transport's own buffer is empty (the bytes must stay in order).
        deadline = loop.time() + self._settings.send_stall_s
        while transport.get_write_buffer_size():
            if transport.is_closing() or loop.time() > deadline:
                raise _SendFailed("the response headers could not be sent")
            await asyncio.sleep(0.001)
        fd = os.dup(sock.fileno())
        handed[0] = True
        return await loop.run_in_executor(self._pool, send_pages_blocking, fd, version, served,
                                          self._settings.send_stall_s, self._cache.give_back)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# ---- the daemon's view ---------------------------------------------------------------------

class PeerService:
    """What the daemon starts for ``--peer-listen``: the tracker, the asker's source and the
    owner's server over one membership. ``describe`` feeds ``objfs peers``."""

    def __init__(self, membership: Membership, secret: bytes, metrics: Metrics, *,
                 bucket: str, prefix: str, listen: tuple[str, int],
                 settings: PeerSettings = PeerSettings(),
                 serve_limit: TokenBucket | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.membership = membership
        self.settings = settings
        self.bucket = bucket
        self.prefix = prefix
        self.listen = listen
        self.tracker = PeerTracker(membership.self_id, metrics, settings, clock=clock)
        self.source = PeerSource(membership, secret, self.tracker, metrics, settings,
                                 clock=clock)
        self._secret = secret
        self._metrics = metrics
        self._serve_limit = serve_limit
        self.server: PeerServer | None = None

    async def start(self, cache: PageCache) -> None:
        self.server = PeerServer(cache, bucket=self.bucket, prefix=self.prefix,
                                 secret=self._secret, listen=self.listen,
                                 membership=self.membership, tracker=self.tracker,
                                 metrics=self._metrics, settings=self.settings,
                                 serve_limit=self._serve_limit)
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        await self.source.close()

    def describe(self) -> dict[str, Any]:
        """Loop only (the control endpoint's handler runs there)."""
        ring = self.membership.ring()
        return {"self": ring.self_id, "listen": "%s:%d" % self.listen,
                "bucket": self.bucket, "prefix": self.prefix,
                "extent_pages": ring.extent_pages,
                "members": self.tracker.describe(ring.members)}
