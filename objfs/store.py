"""The object-store client: control calls through botocore, bulk bytes through aiohttp.

Control calls (HEAD, the start-up access check) use a botocore S3 client, which brings the
standard credential chain (environment, profile, SSO, instance role) and error parsing. Bulk
traffic (ranged GETs, and the listing pages, whose botocore parsing cost ~10x more CPU than the
C expat parse here) goes through aiohttp on the daemon's uvloop thread, signed with
botocore's own SigV4 signer: about half the client CPU per request of boto3, and never a
hand-rolled signature. Every ranged GET carries ``If-Match: <etag>`` so bytes of two versions
can never mix; a 412 (or a 404 of a version we know existed) is ``StaleObject``.

There is exactly one retry layer: botocore's own retries are off (one attempt), and every call
here retries retryable failures (5xx, SlowDown, 429, timeouts, resets, a body that breaks
mid-stream) with ``retry.Backoff``. A broken body resumes from the last byte received.
"""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import errno
import logging
import re
import time
import datetime
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import aiohttp
import boto3
import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.exceptions
import yarl
from xml.etree import ElementTree

from objfs.config import RetryConfig, StoreConfig
from objfs.errors import (
    AccessDenied,
    BucketNotFound,
    ConfigError,
    ObjfsError,
    OriginError,
    OriginUnreachable,
    StaleObject,
    classify_origin_error,
)
from objfs.loop import EventLoopThread
from objfs.metrics import Metrics
from objfs.retry import Backoff

log = logging.getLogger(__name__)

_PROBE_RETRY = RetryConfig(base_delay_s=0.1, max_delay_s=0.5, max_attempts=3, budget_s=4.0)
_CODE_RE = re.compile(rb"<Code>([^<]*)</Code>")
_MESSAGE_RE = re.compile(rb"<Message>([^<]*)</Message>")


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One listed object: its full key, size, ETag (with quotes, as S3 sends it) and mtime."""

    key: str
    size: int
    etag: str
    mtime_ns: int


def _parse_listing(body: bytes) -> tuple[list[ObjectInfo], str | None]:
    """A ListObjectsV2 answer -> (objects, continuation token or None when complete)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise OriginError(f"unparsable listing: {exc}") from None
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    key_tag, size_tag, etag_tag, mtime_tag = (ns + "Key", ns + "Size", ns + "ETag",
                                              ns + "LastModified")
    objects = [ObjectInfo(key=c.findtext(key_tag) or "", size=int(c.findtext(size_tag) or 0),
                          etag=c.findtext(etag_tag) or "",
                          mtime_ns=_iso_ns(c.findtext(mtime_tag) or ""))
               for c in root.iterfind(ns + "Contents")]
    if (root.findtext(ns + "IsTruncated") or "").lower() != "true":
        return objects, None
    token = root.findtext(ns + "NextContinuationToken")
    if not token:
        raise OriginError("listing truncated without a continuation token")
    return objects, token


def _iso_ns(text: str) -> int:
    """'2026-11-23T13:19:07.123Z' -> ns since the epoch (0 if absent or unparsable)."""
    try:
        value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return 0
    return _mtime_ns(value)


def _mtime_ns(value: Any) -> int:
    # botocore parses LastModified into an aware datetime.
    return calendar.timegm(value.utctimetuple()) * 1_000_000_000 + value.microsecond * 1000


def _translate_botocore(exc: Exception, what: str) -> ObjfsError:
    """Map a botocore exception into the objfs family (the one place this happens)."""
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        code = str(err.get("Code") or "")
        if code.isdigit() and not status:
            status = int(code)
        message = str(err.get("Message") or "")
        return classify_origin_error(status, code, f"{what}: {message}".rstrip(": "))
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return ConfigError("no AWS credentials found (set AWS_ACCESS_KEY_ID/"
                           "AWS_SECRET_ACCESS_KEY, a profile, or an instance role)")
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError,
                        botocore.exceptions.ConnectTimeoutError,
                        botocore.exceptions.ReadTimeoutError,
                        botocore.exceptions.ConnectionClosedError,
                        botocore.exceptions.ProxyConnectionError)):
        return OriginUnreachable(f"{what}: {exc}", retryable=True)
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return OriginError(f"{what}: {exc}", retryable=False)
    return OriginError(f"{what}: {type(exc).__name__}: {exc}")


class ObjectStore:
    """Client for one bucket. Control methods block (call them from threads, never the loop);
    ``get_range`` is a coroutine for the loop; ``read_range`` is its blocking bridge."""

    def __init__(self, config: StoreConfig, loop: EventLoopThread, *,
                 metrics: Metrics | None = None, session: boto3.Session | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._loop = loop
        self._metrics = metrics or Metrics()
        self._clock = clock
        session = session or boto3.Session(region_name=config.region)
        self._credentials = session.get_credentials()  # refreshable; None if the chain is empty
        self._boto_session = session
        self._client = self._botocore_client(config.connect_timeout_s, config.read_timeout_s)
        self._http: aiohttp.ClientSession | None = None  # owned by the loop thread

    def _botocore_client(self, connect_timeout_s: float, read_timeout_s: float) -> Any:
        bc_config = botocore.config.Config(
            region_name=self.config.region,
            retries={"total_max_attempts": 1},  # one retry layer: ours
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            max_pool_connections=max(10, self.config.max_connections // 4),
            s3={"addressing_style": "path" if self.config.endpoint else "auto"},
        )
        return self._boto_session.client("s3", endpoint_url=self.config.endpoint, config=bc_config)

    # ---- addressing and signing ------------------------------------------------------------

    def bucket_url(self) -> str:
        if self.config.endpoint:
            return f"{self.config.endpoint}/{self.config.bucket}"
        if "." in self.config.bucket:
            return f"https://s3.{self.config.region}.amazonaws.com/{self.config.bucket}"
        return f"https://{self.config.bucket}.s3.{self.config.region}.amazonaws.com/"

    def object_url(self, key: str) -> str:
        quoted = quote(key, safe="/~")
        if self.config.endpoint:
            return f"{self.config.endpoint}/{self.config.bucket}/{quoted}"
        if "." in self.config.bucket:
            return f"https://s3.{self.config.region}.amazonaws.com/{self.config.bucket}/{quoted}"
        return f"https://{self.config.bucket}.s3.{self.config.region}.amazonaws.com/{quoted}"

    def _signed_headers(self, method: str, url: str, headers: dict[str, str]) -> dict[str, str]:
        if self._credentials is None:
            raise ConfigError("no AWS credentials found")
        request = botocore.awsrequest.AWSRequest(method=method, url=url, headers=headers)
        botocore.auth.S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3",
                                  self.config.region).add_auth(request)
        return dict(request.headers.items())

    # ---- control calls (blocking) ----------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], Any], retry: RetryConfig | None = None) -> Any:
        """Run one botocore call under the retry policy; raise typed errors."""
        backoff = Backoff(retry or self.config.retry, clock=self._clock)
        while True:
            try:
                self._metrics.inc(f"origin_{what}_requests_total")
                return fn()
            except Exception as exc:  # noqa: BLE001 - translated right here
                err = exc if isinstance(exc, ObjfsError) else _translate_botocore(exc, what)
                self._metrics.inc(f"origin_{what}_errors_total")
                retryable = isinstance(err, OriginError) and err.retryable
                delay = backoff.next_delay() if retryable else None
                if delay is None:
                    raise err from (None if err is exc else exc)
                self._metrics.inc(f"origin_{what}_retries_total")
                log.debug("retrying %s in %.2fs after %s", what, delay, err)
                time.sleep(delay)

    def check_access(self) -> None:
        """Prove endpoint, credentials, bucket and prefix are usable; one-line typed errors.

        A one-key listing with short timeouts and a small retry budget, so a mount against a
        dead or silent endpoint fails in seconds instead of hanging for the bulk timeouts.
        """
        if self._credentials is None:
            raise ConfigError("no AWS credentials found (set AWS_ACCESS_KEY_ID/"
                              "AWS_SECRET_ACCESS_KEY, a profile, or an instance role)")
        where = self.config.endpoint or f"AWS S3 ({self.config.region})"
        probe = self._botocore_client(connect_timeout_s=2.0, read_timeout_s=2.5)
        try:
            self._call("list", lambda: probe.list_objects_v2(
                Bucket=self.config.bucket, Prefix=self.config.prefix, MaxKeys=1),
                retry=_PROBE_RETRY)
        except BucketNotFound:
            raise BucketNotFound(f"bucket {self.config.bucket!r} does not exist at {where}") from None
        except OriginUnreachable as exc:
            raise OriginUnreachable(f"cannot reach the object store at {where}: {exc}") from None
        except OriginError as exc:
            if exc.errno == errno.EACCES:
                raise AccessDenied(f"access denied to bucket {self.config.bucket!r} at {where} "
                                   f"(check credentials): {exc.code or exc}") from None
            raise
        finally:
            probe.close()

    def list_pages(self, prefix: str | None = None) -> Iterator[list[ObjectInfo]]:
        """Flat ListObjectsV2 (no delimiter) of ``prefix``, one page (<=1000 keys) at a time.

        Pages are fetched on the event loop with one page of prefetch: the next page is on the
        wire while the caller applies this one. At most two pages are held in memory; each
        page request is retried on its own. BLOCKS the calling thread.
        """
        prefix = self.config.prefix if prefix is None else prefix
        pending = self._loop.submit(self._list_page(prefix, None))
        try:
            while True:
                objects, token = pending.result()
                if token is not None:
                    pending = self._loop.submit(self._list_page(prefix, token))
                yield objects
                if token is None:
                    return
        finally:
            pending.cancel()

    async def _list_page(self, prefix: str, token: str | None) -> tuple[list[ObjectInfo],
                                                                          str | None]:
        query = {"list-type": "2", "max-keys": "1000", "prefix": prefix}
        if token is not None:
            query["continuation-token"] = token
        # Canonical (sorted, RFC 3986) query: what SigV4 signs is exactly what is sent.
        url = self.bucket_url() + "?" + "&".join(
            f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query.items()))
        backoff = Backoff(self.config.retry, clock=self._clock)
        session = await self._session()
        while True:
            self._metrics.inc("origin_list_requests_total")
            try:
                headers = self._signed_headers("GET", url, {})
                async with session.get(yarl.URL(url, encoded=True), headers=headers) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        raise self._error_from_body(resp.status, body, f"list {prefix!r}")
                return _parse_listing(body)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                err: OriginError = OriginUnreachable(f"list {prefix!r}: {type(exc).__name__}: "
                                                     f"{exc}", retryable=True)
            except OriginError as exc:
                err = exc
            self._metrics.inc("origin_list_errors_total")
            delay = backoff.next_delay() if err.retryable else None
            if delay is None:
                raise err
            self._metrics.inc("origin_list_retries_total")
            log.debug("retrying list in %.2fs after %s", delay, err)
            await asyncio.sleep(delay)

    def head(self, key: str) -> ObjectInfo:
        resp = self._call("head", lambda: self._client.head_object(
            Bucket=self.config.bucket, Key=key))
        return ObjectInfo(key=key, size=int(resp["ContentLength"]), etag=resp.get("ETag", ""),
                          mtime_ns=_mtime_ns(resp["LastModified"]))

    # ---- bulk bytes (event loop) -----------------------------------------------------------

    async def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            connector = aiohttp.TCPConnector(limit=self.config.max_connections,
                                             ttl_dns_cache=300, enable_cleanup_closed=True)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout_s,
                                            sock_read=self.config.read_timeout_s)
            self._http = aiohttp.ClientSession(connector=connector, timeout=timeout,
                                               auto_decompress=False)
        return self._http

    async def get_range(self, key: str, etag: str, start: int, end: int) -> bytearray:
        """Bytes [start, end) of the version ``etag`` of ``key``; retried, resumed mid-body."""
        buf = bytearray(end - start)
        received = 0  # bytes of buf already filled; a retry asks only for the rest
        backoff = Backoff(self.config.retry, clock=self._clock)
        while True:
            try:
                received = await self._get_into(key, etag, start, buf, received)
                return buf
            except OriginError as err:
                self._metrics.inc("origin_get_errors_total")
                if not err.retryable:
                    raise
                delay = backoff.next_delay()
                if delay is None:
                    raise
                self._metrics.inc("origin_get_retries_total")
                log.debug("retrying GET %s [%d,%d) in %.2fs after %s", key, start + received,
                          start + len(buf), delay, err)
                await asyncio.sleep(delay)
                received = err.received if isinstance(err, _PartialBody) else received

    async def _get_into(self, key: str, etag: str, start: int, buf: bytearray,
                        received: int) -> int:
        url = self.object_url(key)
        first = start + received
        last = start + len(buf) - 1
        headers = self._signed_headers("GET", url, {"Range": f"bytes={first}-{last}",
                                                    "If-Match": etag})
        session = await self._session()
        self._metrics.inc("origin_get_requests_total")
        try:
            async with session.get(yarl.URL(url, encoded=True), headers=headers) as resp:
                if resp.status not in (200, 206):
                    body = await resp.read()
                    raise self._http_error(resp.status, body, key)
                if resp.status == 200 and (first != 0 or last + 1 != resp.content_length):
                    # The server ignored Range: skip to our bytes (correct, if wasteful).
                    await resp.content.readexactly(first)
                view = memoryview(buf)
                try:
                    while received < len(buf):
                        chunk = await resp.content.readany()
                        if not chunk:
                            raise OriginError(f"GET {key}: body ended early", retryable=True)
                        take = min(len(chunk), len(buf) - received)
                        view[received:received + take] = chunk[:take]
                        received += take
                        self._metrics.inc("origin_get_bytes", take)
                except (aiohttp.ClientError, asyncio.TimeoutError, OriginError) as exc:
                    raise _PartialBody(f"GET {key}: body broke after {received} bytes: {exc}",
                                       received) from exc
                return received
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                asyncio.TimeoutError) as exc:
            raise _PartialBody(f"GET {key}: {type(exc).__name__}: {exc}", received) from exc

    @staticmethod
    def _error_from_body(status: int, body: bytes, what: str) -> OriginError:
        code_m = _CODE_RE.search(body)
        msg_m = _MESSAGE_RE.search(body)
        code = code_m.group(1).decode(errors="replace") if code_m else None
        message = msg_m.group(1).decode(errors="replace") if msg_m else ""
        return classify_origin_error(status, code, f"{what}: {message}")

    def _http_error(self, status: int, body: bytes, key: str) -> ObjfsError:
        err = self._error_from_body(status, body, f"GET {key}")
        if err.errno in (errno.ESTALE, errno.ENOENT):
            # We only GET versions we listed: 412 or 404 both mean it changed at the origin.
            return StaleObject(f"{key} changed at the origin ({status} {err.code or ''})".strip())
        return err

    def read_range(self, key: str, etag: str, start: int, end: int) -> bytearray:
        """Blocking bridge for worker threads."""
        return self._loop.run(self.get_range(key, etag, start, end))

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def close(self) -> None:
        try:
            self._loop.run(self.aclose(), timeout=5)
        except Exception:  # closing is best effort at shutdown
            pass
        self._client.close()


class _PartialBody(OriginError):
    """A retryable failure that remembers how many bytes had arrived."""

    def __init__(self, message: str, received: int) -> None:
        super().__init__(message, retryable=True)
        self.received = received
