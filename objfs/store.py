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

Writes (PUT, the multipart calls, server-side copy, delete) are coroutines for the loop too,
built on one request helper (``_request``): the body is a caller's buffer sent without a copy
and re-sent as-is on a retry; its hash is computed once per body, in a worker thread for large
bodies (hashlib releases the GIL), and handed to botocore's signer (``_PayloadAuth``): a signed
``x-amz-content-sha256`` over http, ``UNSIGNED-PAYLOAD`` plus ``Content-MD5`` over https (what
botocore itself does). Answers are parsed with ElementTree; a 200 whose body is an ``<Error>``
(CompleteMultipartUpload and CopyObject do that) is an error.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import dataclasses
import datetime
import email.utils
import errno
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote, unquote_plus
from xml.sax.saxutils import escape as xml_escape

import aiohttp
import aiohttp.payload
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
    InvalidArgument,
    ObjfsError,
    OriginError,
    OriginUnreachable,
    StaleObject,
    classify_origin_error,
)
from objfs.loop import EventLoopThread
from objfs.metrics import Metrics
from objfs.retry import Backoff
from objfs.uploads import UploadLedger

log = logging.getLogger(__name__)

_PROBE_RETRY = RetryConfig(base_delay_s=0.1, max_delay_s=0.5, max_attempts=3, budget_s=4.0)
_CODE_RE = re.compile(rb"<Code>([^<]*)</Code>")
_MESSAGE_RE = re.compile(rb"<Message>([^<]*)</Message>")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
# S3's limits: one CopyObject copies at most 5 GiB; a multipart upload has at most 10,000 parts.
COPY_MAX_BYTES = 5 * GiB
MAX_PARTS = 10_000
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
_HASH_INLINE_BYTES = 256 * KiB  # smaller bodies are hashed on the loop, larger ones in a thread
_META_PREFIX = "x-amz-meta-"
_META_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
# Characters an XML 1.0 document cannot hold as they are (plus CR, which parsers turn into LF).
_XML_UNSAFE = re.compile("[^\t\n\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def normalize_etag(raw: str | None) -> str:
    """An ETag in the one form objfs keeps: in double quotes, as listings and headers give it.

    CopyObjectResult bodies (SeaweedFS), some XML answers and hand-made values give it bare;
    a mix would make the same version look changed (the tree compares ETags, page ids hash
    them). Every ``ObjectInfo`` passes through here, whatever response it came from."""
    if not raw:
        return ""
    if raw[0] == '"' and raw[-1] == '"' and len(raw) > 1:
        return raw
    etag = raw.strip().strip('"')
    return f'"{etag}"' if etag else ""


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object: its full key, size, ETag (always in quotes: ``normalize_etag``) and mtime."""

    key: str
    size: int
    etag: str
    mtime_ns: int

    def __post_init__(self) -> None:
        etag = self.etag
        if etag and not (etag[0] == '"' and etag[-1] == '"' and len(etag) > 1):
            object.__setattr__(self, "etag", normalize_etag(etag))


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectMeta:
    """HEAD of one object: its ``ObjectInfo`` plus user metadata (``x-amz-meta-NAME`` headers,
    NAME lower-case without the prefix) and Content-Type."""

    info: ObjectInfo
    metadata: Mapping[str, str]
    content_type: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    headers: Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDictProxy)
    body: bytes


class _PayloadAuth(botocore.auth.S3SigV4Auth):
    """botocore's S3 SigV4 signer, told the payload hash instead of hashing the body itself:
    the hash is computed once per body (off the loop when large), not once per signing."""

    def __init__(self, credentials: Any, region: str, payload_hash: str) -> None:
        super().__init__(credentials, "s3", region)
        self._payload_hash = payload_hash

    def payload(self, request: Any) -> str:
        return self._payload_hash


class _BufferPayload(aiohttp.payload.BytesPayload):
    """A request body over the caller's buffer (no copy; sent again as-is on a retry).

    BytesPayload warns about bodies over 1 MiB "locking the loop"; a part is handed to the
    transport in one call that copies nothing, which is what we want, so the warning is skipped.
    """

    def __init__(self, value: memoryview) -> None:
        aiohttp.payload.Payload.__init__(self, value, content_type="application/octet-stream")
        self._size = value.nbytes


def _xml_root(body: bytes, what: str) -> tuple[ElementTree.Element, str]:
    """Parse an S3 XML answer -> (root element, '{namespace}' or '')."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise OriginError(f"{what}: unparsable answer: {exc}") from None
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    return root, ns


def _is_error_document(body: bytes) -> bool:
    """Whether a 200 answer is really an ``<Error>`` (CompleteMultipartUpload, CopyObject)."""
    head = body[:512].lstrip()
    if b"<Error" not in head:
        return False
    try:
        return ElementTree.fromstring(body).tag.rpartition("}")[2] == "Error"
    except ElementTree.ParseError:
        return False


def _http_date_ns(value: str | None) -> int:
    """An HTTP date header -> ns since the epoch; now if absent or unparsable."""
    if value:
        try:
            return _mtime_ns(email.utils.parsedate_to_datetime(value))
        except (TypeError, ValueError):
            pass
    return time.time_ns()


def _meta_headers(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """User metadata -> ``x-amz-meta-*`` headers. Names and values must be plain ASCII (S3
    sends them back as HTTP headers); anything else is rejected rather than mangled."""
    headers: dict[str, str] = {}
    for name, value in (metadata or {}).items():
        lname = name.lower()
        if not _META_NAME_RE.match(lname):
            raise InvalidArgument(f"metadata name {name!r} is not [a-z0-9_.-]")
        if not value.isascii() or any(c in value for c in "\r\n\0"):
            raise InvalidArgument(f"metadata {name!r}: value must be ASCII without newlines")
        headers[_META_PREFIX + lname] = value
    return headers


def _as_view(body: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(body)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    if not view.c_contiguous:
        raise InvalidArgument("request body must be a contiguous buffer")
    return view


def _parse_listing(body: bytes) -> tuple[list[ObjectInfo], str | None]:
    """A ListObjectsV2 answer -> (objects, continuation token or None when complete).

    The listing is asked with ``encoding-type=url``: a key may hold characters XML 1.0
    cannot carry (e.g. U+0001), which would make the whole page unparsable for every host.
    Keys come back percent-encoded (spaces as ``%20`` or ``+``, a literal ``+`` as ``%2B``),
    so they are decoded with ``unquote_plus``, as botocore does. CPU-bound: callers run it
    off the event loop.

    Building an ElementTree of a 1000-key page costs ~20 µs per key, more than everything
    else a relist does per key, so a URL-encoded page is read with ``bytes.find`` instead
    (``_parse_listing_regex``); a page it does not fully understand (no URL encoding, a
    missing field, an entity it does not expect) goes through ElementTree. Both give the
    same objects (tests/unit/test_listing_parse.py)."""
    fast = _parse_listing_regex(body)
    if fast is not None:
        return fast
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise OriginError(f"unparsable listing: {exc}") from None
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    key_tag, size_tag, etag_tag, mtime_tag = (ns + "Key", ns + "Size", ns + "ETag",
                                              ns + "LastModified")
    url_encoded = (root.findtext(ns + "EncodingType") or "").lower() == "url"
    decode = unquote_plus if url_encoded else _same
    objects = [ObjectInfo(key=decode(c.findtext(key_tag) or ""),
                          size=int(c.findtext(size_tag) or 0),
                          etag=c.findtext(etag_tag) or "",
                          mtime_ns=_iso_ns(c.findtext(mtime_tag) or ""))
               for c in root.iterfind(ns + "Contents")]
    if (root.findtext(ns + "IsTruncated") or "").lower() != "true":
        return objects, None
    token = root.findtext(ns + "NextContinuationToken")
    if not token:
        raise OriginError("listing truncated without a continuation token")
    return objects, token


_ENCODING_URL_RE = re.compile(rb"<EncodingType>\s*url\s*</EncodingType>", re.IGNORECASE)
_TRUNCATED_RE = re.compile(rb"<IsTruncated>\s*true\s*</IsTruncated>", re.IGNORECASE)
_TOKEN_RE = re.compile(rb"<NextContinuationToken>([^<&]*)</NextContinuationToken>")
_QUOTE_ENTITIES = (b"&quot;", b"&#34;", b"&#x22;")


def _field(block: bytes, start: bytes, end: bytes) -> bytes | None:
    i = block.find(start)
    if i < 0:
        return None
    i += len(start)
    j = block.find(end, i)
    return block[i:j] if j >= 0 else None


def _parse_listing_regex(body: bytes) -> tuple[list[ObjectInfo], str | None] | None:
    """``_parse_listing`` of a plain URL-encoded page, or None to use ElementTree: each
    <Contents> is cut out and its four fields found with ``bytes.find``, in whatever order
    the server writes them (S3's documented order, SeaweedFS's, moto's). A field holding
    '<' or an entity other than a quote in an ETag sends the page to ElementTree."""
    if _ENCODING_URL_RE.search(body) is None or b"<Error>" in body[:512]:
        return None
    blocks = body.split(b"<Contents>")[1:]
    times: dict[bytes, int] = {}  # a page's objects often share their LastModified
    objects = []
    for block in blocks:
        block = block[:block.find(b"</Contents>")]
        key = _field(block, b"<Key>", b"</Key>")
        etag = _field(block, b"<ETag>", b"</ETag>")
        size = _field(block, b"<Size>", b"</Size>")
        modified = _field(block, b"<LastModified>", b"</LastModified>")
        if key is None or etag is None or size is None or modified is None \
                or b"&" in key or not size.isdigit():
            return None
        if b"&" in etag:
            for entity in _QUOTE_ENTITIES:
                etag = etag.replace(entity, b'"')
            if b"&" in etag:
                return None
        mtime = times.get(modified)
        if mtime is None:
            mtime = times[modified] = _iso_ns(modified.decode())
        text = key.decode()
        if "%" in text or "+" in text:
            text = unquote_plus(text)
        objects.append(ObjectInfo(text, int(size), etag.decode(), mtime))
    if _TRUNCATED_RE.search(body) is None:
        return objects, None
    token = _TOKEN_RE.search(body)
    if token is None or not token.group(1):
        return None  # let the full parser say what is wrong
    return objects, token.group(1).decode()


def _same(text: str) -> str:
    return text


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_MICROSECOND = datetime.timedelta(microseconds=1)


def _iso_ns(text: str) -> int:
    """'2026-11-23T13:19:07.123Z' -> ns since the epoch (0 if absent or unparsable).
    Integer timedelta arithmetic: a quarter of the cost of timegm(utctimetuple()), which
    was a third of a listing page's parse."""
    try:
        value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return 0
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return (value - _EPOCH) // _MICROSECOND * 1000


def _mtime_ns(value: Any) -> int:
    # botocore parses LastModified into an aware datetime.
    return calendar.timegm(value.utctimetuple()) * 1_000_000_000 + value.microsecond * 1000


class _CredentialCache:
    """Credentials for signing on the event loop, refreshed off it.

    Instance-role, SSO and assume-role credentials expire; botocore refreshes them inside
    ``get_frozen_credentials()`` with a network call, which on the loop would stop every
    origin request of the mount while it runs. So signing uses a frozen copy, and when
    botocore says a refresh is due (its advisory window, ~15 min before expiry) one worker
    thread refreshes while requests keep signing with the still-valid copy. A failed refresh
    is logged and tried again after ``RETRY_S``; if the credentials expire meanwhile, the
    origin refuses requests (403, EACCES) until a refresh succeeds. Thread-safe: ``_frozen``,
    ``_refreshing`` and ``_next_try`` are guarded by ``_lock``.
    """

    RETRY_S = 10.0

    def __init__(self, credentials: Any, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._source = credentials  # botocore Credentials (maybe refreshable) or None
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._frozen = credentials.get_frozen_credentials() if credentials is not None else None
        self._refreshing = False
        self._next_try = 0.0

    @property
    def present(self) -> bool:
        return self._source is not None

    def frozen(self) -> Any:
        if self._source is None:
            raise ConfigError("no AWS credentials found")
        refresh_needed = getattr(self._source, "refresh_needed", None)
        if refresh_needed is not None and refresh_needed():
            with self._lock:
                start = not self._refreshing and self._clock() >= self._next_try
                if start:
                    self._refreshing = True
            if start:
                threading.Thread(target=self._refresh, name="objfs-credentials",
                                 daemon=True).start()
        with self._lock:
            return self._frozen

    def _refresh(self) -> None:
        try:
            frozen = self._source.get_frozen_credentials()
        except Exception as exc:  # noqa: BLE001 - logged; the old copy signs until it expires
            self._metrics.inc("origin_credential_refresh_errors_total")
            log.warning("refreshing AWS credentials failed (the current ones are used until "
                        "they expire): %s", exc)
            frozen = None
        with self._lock:
            if frozen is not None:
                self._frozen = frozen
            else:
                self._next_try = self._clock() + self.RETRY_S
            self._refreshing = False
        if frozen is not None:
            self._metrics.inc("origin_credential_refreshes_total")


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
                 clock: Callable[[], float] = time.monotonic,
                 uploads: UploadLedger | None = None) -> None:
        self.config = config
        # Where multipart uploads in progress are written down (see objfs.uploads).
        self.uploads = uploads
        self._loop = loop
        self._metrics = metrics or Metrics()
        self._clock = clock
        session = session or boto3.Session(region_name=config.region)
        self._credentials = _CredentialCache(session.get_credentials(), self._metrics)
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
        request = botocore.awsrequest.AWSRequest(method=method, url=url, headers=headers)
        botocore.auth.S3SigV4Auth(self._credentials.frozen(), "s3",
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
        if not self._credentials.present:
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
        query = {"list-type": "2", "max-keys": "1000", "prefix": prefix, "encoding-type": "url"}
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
                # ~5 ms of CPU per 1000-key page: parsed in a worker thread, never on the loop.
                return await asyncio.get_running_loop().run_in_executor(None, _parse_listing,
                                                                        body)
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

    def head_meta(self, key: str) -> ObjectMeta:
        """Blocking bridge of ``head_object`` (user metadata included)."""
        return self._loop.run(self.head_object(key))

    def copy(self, src_key: str, dst_key: str, size: int, metadata: Mapping[str, str] | None = None,
             **kwargs: Any) -> ObjectInfo:
        """Blocking bridge of ``copy_object``."""
        return self._loop.run(self.copy_object(src_key, dst_key, size, metadata, **kwargs))

    def abort(self, key: str, upload_id: str) -> None:
        """Blocking bridge to ``abort_multipart``."""
        self._loop.run(self.abort_multipart(key, upload_id))

    def delete(self, key: str) -> None:
        """Blocking bridge of ``delete_object``."""
        self._loop.run(self.delete_object(key))

    # ---- writes (event loop) ---------------------------------------------------------------

    def _url(self, key: str | None, query: Mapping[str, str] | None = None) -> str:
        url = self.object_url(key) if key is not None else self.bucket_url().rstrip("/")
        if query:
            # Canonical (sorted, RFC 3986) query: what SigV4 signs is exactly what is sent.
            url += "?" + "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                                  for k, v in sorted(query.items()))
        return url

    async def _payload_headers(self, url: str, view: memoryview | None,
                               content_md5: bool) -> tuple[str, dict[str, str]]:
        """(payload hash for the signer, extra headers) of one body, computed once for all its
        attempts; large bodies are hashed in a worker thread so the loop keeps serving."""
        if view is None or view.nbytes == 0:
            extra = {"Content-MD5": base64.b64encode(hashlib.md5(b"").digest()).decode()} \
                if content_md5 else {}
            return _EMPTY_SHA256, extra
        https = url.startswith("https:")

        def digest() -> tuple[str, dict[str, str]]:
            extra: dict[str, str] = {}
            if https or content_md5:
                md5 = hashlib.md5(view, usedforsecurity=False).digest()
                extra["Content-MD5"] = base64.b64encode(md5).decode()
            # Over https with a Content-MD5 S3 takes an unsigned payload (botocore's own rule).
            payload = _UNSIGNED_PAYLOAD if https else hashlib.sha256(view).hexdigest()
            return payload, extra

        if view.nbytes <= _HASH_INLINE_BYTES:
            return digest()
        return await asyncio.get_running_loop().run_in_executor(None, digest)

    def _signed_payload_headers(self, method: str, url: str, headers: dict[str, str],
                                payload_hash: str) -> dict[str, str]:
        request = botocore.awsrequest.AWSRequest(method=method, url=url, headers=headers)
        _PayloadAuth(self._credentials.frozen(), self.config.region,
                     payload_hash).add_auth(request)
        return dict(request.headers.items())

    async def _request(self, what: str, method: str, key: str | None, *,
                       query: Mapping[str, str] | None = None,
                       headers: Mapping[str, str] | None = None,
                       body: bytes | bytearray | memoryview | None = None,
                       ok: Sequence[int] = (200,), error_in_200: bool = False,
                       content_md5: bool = False) -> _Reply:
        """One origin request under the retry policy: signed, sent, answer read whole.

        ``body`` must stay unchanged until this returns (it is re-sent on a retry). A status
        outside ``ok`` (or, with ``error_in_200``, an ``<Error>`` document in a 200) raises the
        classified ``OriginError``. Metrics: ``origin_{what}_requests_total``,
        ``_errors_total``, ``_retries_total`` and ``origin_{what}_bytes`` (body bytes sent).
        """
        url = self._url(key, query)
        view = _as_view(body) if body is not None else None
        payload_hash, extra = await self._payload_headers(url, view, content_md5)
        base_headers = {**(headers or {}), **extra}
        target = f"{what} {key if key is not None else self.config.bucket}"
        backoff = Backoff(self.config.retry, clock=self._clock)
        session = await self._session()
        while True:
            self._metrics.inc(f"origin_{what}_requests_total")
            try:
                signed = self._signed_payload_headers(method, url, dict(base_headers),
                                                      payload_hash)
                data = _BufferPayload(view) if view is not None else None
                async with session.request(method, yarl.URL(url, encoded=True), headers=signed,
                                           data=data, allow_redirects=False) as resp:
                    reply = await resp.read()
                    if resp.status not in ok or (error_in_200 and resp.status == 200
                                                 and _is_error_document(reply)):
                        raise self._error_from_body(resp.status, reply, target)
                    if view is not None:
                        self._metrics.inc(f"origin_{what}_bytes", view.nbytes)
                    return _Reply(resp.status, resp.headers, reply)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                err: OriginError = OriginUnreachable(f"{target}: {type(exc).__name__}: {exc}",
                                                     retryable=True)
            except OriginError as exc:
                err = exc
            self._metrics.inc(f"origin_{what}_errors_total")
            delay = backoff.next_delay() if err.retryable else None
            if delay is None:
                raise err
            self._metrics.inc(f"origin_{what}_retries_total")
            log.debug("retrying %s in %.2fs after %s", target, delay, err)
            await asyncio.sleep(delay)

    async def head_object(self, key: str) -> ObjectMeta:
        """HEAD ``key``: size, ETag, mtime, user metadata. A missing key raises an error whose
        errno is ENOENT."""
        reply = await self._request("head", "HEAD", key)
        h = reply.headers
        metadata = {name.lower()[len(_META_PREFIX):]: value for name, value in h.items()
                    if name.lower().startswith(_META_PREFIX)}
        info = ObjectInfo(key=key, size=int(h.get("Content-Length", "0")),
                          etag=h.get("ETag", ""), mtime_ns=_http_date_ns(h.get("Last-Modified")))
        return ObjectMeta(info, metadata, h.get("Content-Type"))

    async def put_object(self, key: str, body: bytes | bytearray | memoryview,
                         metadata: Mapping[str, str] | None = None) -> ObjectInfo:
        """One PUT of the whole object (at most 5 GiB). ``mtime_ns`` is the server's Date."""
        headers = _meta_headers(metadata)
        view = _as_view(body)
        reply = await self._request("put", "PUT", key, headers=headers, body=view)
        return ObjectInfo(key=key, size=view.nbytes, etag=reply.headers.get("ETag", ""),
                          mtime_ns=_http_date_ns(reply.headers.get("Date")))

    async def create_multipart(self, key: str,
                               metadata: Mapping[str, str] | None = None) -> str:
        """CreateMultipartUpload -> the upload id. Metadata is given here, not at completion."""
        reply = await self._request("create_multipart", "POST", key, query={"uploads": ""},
                                    headers=_meta_headers(metadata))
        root, ns = _xml_root(reply.body, f"create multipart {key}")
        upload_id = root.findtext(ns + "UploadId")
        if not upload_id:
            raise OriginError(f"create multipart {key}: no UploadId in the answer")
        if self.uploads is not None:
            self.uploads.started(key, upload_id)
        return upload_id

    async def upload_part(self, key: str, upload_id: str, part_number: int,
                          body: bytes | bytearray | memoryview) -> str:
        """UploadPart -> the part's ETag. ``body`` must not change until this returns."""
        if not 1 <= part_number <= MAX_PARTS:
            raise InvalidArgument(f"part number {part_number} is outside 1..{MAX_PARTS}")
        reply = await self._request("upload_part", "PUT", key, body=body, query={
            "partNumber": str(part_number), "uploadId": upload_id})
        etag = reply.headers.get("ETag")
        if not etag:
            raise OriginError(f"upload part {part_number} of {key}: no ETag in the answer")
        return etag

    async def complete_multipart(self, key: str, upload_id: str,
                                 parts: Sequence[tuple[int, str]], *,
                                 size: int | None = None) -> ObjectInfo:
        """CompleteMultipartUpload of ``parts`` ((number, etag), ascending) -> the object.

        A 200 carrying an ``<Error>`` is an error (retried when its code is retryable). The
        answer has no size or mtime: with ``size`` given, mtime is the server's Date; without
        it one HEAD fetches both.
        """
        if not parts:
            raise InvalidArgument(f"complete {key}: no parts")
        numbers = [number for number, _ in parts]
        if numbers != sorted(set(numbers)):
            raise InvalidArgument(f"complete {key}: part numbers must ascend without repeats")
        doc = "".join(f"<Part><PartNumber>{number}</PartNumber><ETag>{xml_escape(etag)}</ETag>"
                      f"</Part>" for number, etag in parts)
        body = f"<CompleteMultipartUpload>{doc}</CompleteMultipartUpload>".encode()
        try:
            reply = await self._request("complete_multipart", "POST", key, body=body,
                                        query={"uploadId": upload_id}, error_in_200=True)
        except OriginError as exc:
            if exc.code != "NoSuchUpload":
                raise
            # A retry after a completion whose answer was lost finds the upload gone. If the
            # object is exactly ours (its ETag is the multipart ETag of our parts), it worked.
            done = await self._completed_as(key, parts)
            if done is None:
                raise
            self._metrics.inc("origin_complete_multipart_recovered_total")
            self._upload_ended(upload_id)
            return done if size is None else dataclasses.replace(done, size=size)
        self._upload_ended(upload_id)
        root, ns = _xml_root(reply.body, f"complete {key}")
        etag = root.findtext(ns + "ETag") or ""
        if size is None:
            return (await self.head_object(key)).info
        return ObjectInfo(key=key, size=size, etag=etag,
                          mtime_ns=_http_date_ns(reply.headers.get("Date")))

    async def _completed_as(self, key: str,
                            parts: Sequence[tuple[int, str]]) -> ObjectInfo | None:
        """The object at ``key`` if it is the completion of exactly ``parts``, else None."""
        try:
            digests = b"".join(bytes.fromhex(etag.strip('"')) for _, etag in parts)
        except ValueError:
            return None  # part ETags that are not MD5s (e.g. SSE-KMS): cannot tell
        expected = f'"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"'
        try:
            meta = await self.head_object(key)
        except OriginError:
            return None
        return meta.info if meta.info.etag == expected else None

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        """AbortMultipartUpload; an upload that is already gone (404) counts as aborted."""
        try:
            await self._request("abort_multipart", "DELETE", key, query={"uploadId": upload_id},
                                ok=(200, 204))
        except OriginError as exc:
            if exc.status != 404:
                raise
        self._upload_ended(upload_id)

    def _upload_ended(self, upload_id: str) -> None:
        if self.uploads is not None:
            self.uploads.ended(upload_id)

    async def list_multipart_uploads(self, prefix: str = "") -> list[tuple[str, str]]:
        """Multipart uploads in progress under ``prefix``: [(key, upload_id)], all pages.
        Keys come URL-encoded, as in listings (``_parse_listing``)."""
        found: list[tuple[str, str]] = []
        query = {"uploads": "", "prefix": prefix}
        while True:
            reply = await self._request("list_uploads", "GET", None, query=query)
            root, ns = _xml_root(reply.body, f"list uploads {prefix!r}")
            decode = unquote_plus if (root.findtext(ns + "EncodingType") or "").lower() == "url" \
                else _same
            found.extend((decode(u.findtext(ns + "Key") or ""), u.findtext(ns + "UploadId") or "")
                         for u in root.iterfind(ns + "Upload"))
            if (root.findtext(ns + "IsTruncated") or "").lower() != "true":
                return found
            key_marker = root.findtext(ns + "NextKeyMarker") or ""
            id_marker = root.findtext(ns + "NextUploadIdMarker") or ""
            if not key_marker and not id_marker:
                raise OriginError("upload listing truncated without markers")
            query = {"uploads": "", "prefix": prefix, "encoding-type": "url",
                     "key-marker": decode(key_marker), "upload-id-marker": id_marker}

    def _copy_source(self, key: str) -> str:
        return f"/{self.config.bucket}/{quote(key, safe='/~')}"

    async def copy_object(self, src_key: str, dst_key: str, size: int,
                          metadata: Mapping[str, str] | None = None, *,
                          src_etag: str | None = None,
                          multipart_threshold_bytes: int = COPY_MAX_BYTES,
                          part_bytes: int = 512 * MiB, concurrency: int = 8) -> ObjectInfo:
        """Server-side copy of ``src_key`` (``size`` bytes) to ``dst_key``; no data passes here.

        ``metadata=None`` keeps the source's user metadata, a mapping replaces it. With
        ``src_etag`` the copy fails (ESTALE) if the source changed. Objects larger than
        ``multipart_threshold_bytes`` (S3 allows at most 5 GiB per CopyObject) are copied as a
        multipart upload of UploadPartCopy ranges of ``part_bytes`` (raised to fit 10,000
        parts), ``concurrency`` at a time, all pinned to one source ETag; a failure aborts the
        upload, so a half-copied object is never published.
        """
        if size > multipart_threshold_bytes:
            return await self._copy_multipart(src_key, dst_key, size, metadata, src_etag,
                                              part_bytes, concurrency)
        headers = {"x-amz-copy-source": self._copy_source(src_key),
                   "x-amz-metadata-directive": "COPY" if metadata is None else "REPLACE"}
        if src_etag:
            headers["x-amz-copy-source-if-match"] = src_etag
        headers.update(_meta_headers(metadata))
        reply = await self._request("copy", "PUT", dst_key, headers=headers, error_in_200=True)
        root, ns = _xml_root(reply.body, f"copy {src_key} -> {dst_key}")
        return ObjectInfo(key=dst_key, size=size, etag=root.findtext(ns + "ETag") or "",
                          mtime_ns=_iso_ns(root.findtext(ns + "LastModified") or "")
                          or _http_date_ns(reply.headers.get("Date")))

    async def _copy_multipart(self, src_key: str, dst_key: str, size: int,
                              metadata: Mapping[str, str] | None, src_etag: str | None,
                              part_bytes: int, concurrency: int) -> ObjectInfo:
        if part_bytes < 1 or concurrency < 1:
            raise InvalidArgument("copy part size and concurrency must be >= 1")
        if metadata is None or not src_etag:
            # Multipart uploads do not copy metadata: carry it over from a HEAD, which also
            # names the one version every range is copied from.
            meta = await self.head_object(src_key)
            metadata = meta.metadata if metadata is None else metadata
            src_etag = src_etag or meta.info.etag
        part_bytes = max(part_bytes, -(-size // MAX_PARTS))
        ranges = [(n + 1, start, min(start + part_bytes, size))
                  for n, start in enumerate(range(0, size, part_bytes))]
        upload_id = await self.create_multipart(dst_key, metadata)
        source = self._copy_source(src_key)
        limit = asyncio.Semaphore(concurrency)

        async def copy_part(number: int, start: int, end: int) -> tuple[int, str]:
            async with limit:
                reply = await self._request("upload_part_copy", "PUT", dst_key, headers={
                    "x-amz-copy-source": source, "x-amz-copy-source-if-match": src_etag,
                    "x-amz-copy-source-range": f"bytes={start}-{end - 1}"},
                    query={"partNumber": str(number), "uploadId": upload_id},
                    error_in_200=True)
            root, ns = _xml_root(reply.body, f"copy part {number} of {src_key}")
            return number, root.findtext(ns + "ETag") or ""

        tasks = [asyncio.ensure_future(copy_part(*r)) for r in ranges]
        try:
            parts = await asyncio.gather(*tasks)
            return await self.complete_multipart(dst_key, upload_id, parts, size=size)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._abort_quietly(dst_key, upload_id)
            raise

    async def _abort_quietly(self, key: str, upload_id: str) -> bool:
        """Abort after a failure; never raises (the first error is what the caller reports)."""
        try:
            await asyncio.shield(self.abort_multipart(key, upload_id))
            return True
        except BaseException as exc:  # noqa: BLE001 - logged, counted, original error wins
            self._metrics.inc("origin_abort_failures_total")
            log.error("could not abort multipart upload %s of %s: %s", upload_id, key, exc)
            return False

    async def delete_object(self, key: str) -> None:
        """DeleteObject; idempotent (a missing key is success, as S3 itself answers 204)."""
        try:
            await self._request("delete", "DELETE", key, ok=(200, 204))
        except OriginError as exc:
            if exc.status != 404:
                raise

    async def delete_objects(self, keys: Sequence[str], *, batch_size: int = 1000) -> None:
        """DeleteObjects in batches (S3 takes at most 1,000 keys per request; quiet mode).
        Missing keys are success; any other per-key error raises, naming the first failed key
        and the count."""
        if not 1 <= batch_size <= 1000:
            raise InvalidArgument(f"delete batch size {batch_size} is outside 1..1000")
        # A key XML cannot carry (control characters; a CR would arrive as LF) cannot be named
        # in a DeleteObjects body: those go one DeleteObject each.
        for key in [k for k in keys if _XML_UNSAFE.search(k)]:
            await self.delete_object(key)
        keys = [k for k in keys if not _XML_UNSAFE.search(k)]
        for i in range(0, len(keys), batch_size):
            batch = keys[i:i + batch_size]
            doc = "".join(f"<Object><Key>{xml_escape(k)}</Key></Object>" for k in batch)
            body = f"<Delete><Quiet>true</Quiet>{doc}</Delete>".encode()
            reply = await self._request("delete_batch", "POST", None, query={"delete": ""},
                                        body=body, content_md5=True)
            root, ns = _xml_root(reply.body, "delete batch")
            failed = [(e.findtext(ns + "Key") or "", e.findtext(ns + "Code") or "",
                       e.findtext(ns + "Message") or "") for e in root.iterfind(ns + "Error")]
            failed = [f for f in failed if f[1] != "NoSuchKey"]
            if failed:
                key, code, message = failed[0]
                raise classify_origin_error(200, code, f"delete {key} (and {len(failed) - 1} "
                                            f"more): {message}")

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
