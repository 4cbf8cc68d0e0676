"""A real HTTP proxy in front of the S3 server that counts requests and injects faults.

Tests point objfs at the proxy's endpoint instead of the server's: every request still goes over
HTTP on loopback to a real S3 server, nothing inside objfs is mocked. The proxy classifies each
request (``list``, ``list_probe``, ``get``, ``head``, ``put`` (a plain PutObject or any other
PUT), the write calls ``create_multipart``, ``upload_part``, ``complete_multipart``,
``abort_multipart``, ``list_uploads``, ``list_parts``, ``copy``, ``upload_part_copy``,
``delete``, ``delete_batch``, and ``other``), counts requests and response body bytes per
class, records request body sizes and the peak number of requests in flight per class, and can
fail the next N requests of a class with a status/S3 error code (optionally only those whose
path and query match), delay them, or cut the next N response bodies after some bytes.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import socket
import threading
from collections.abc import Callable, Mapping

import aiohttp
from aiohttp import web


def classify(method: str, query: Mapping[str, str], path: str,
             headers: Mapping[str, str] | None = None) -> str:
    copy = any(name.lower() == "x-amz-copy-source" for name in (headers or {}))
    if method == "GET" and "list-type" in query:
        return "list_probe" if query.get("max-keys") == "1" else "list"
    if method == "GET" and "uploads" in query:
        return "list_uploads"
    if method == "GET" and "uploadId" in query:
        return "list_parts"
    if method == "GET" and path.count("/") >= 2 and not query:
        return "get"
    if method == "HEAD":
        return "head"
    if method == "PUT":
        if "partNumber" in query and "uploadId" in query:
            return "upload_part_copy" if copy else "upload_part"
        return "copy" if copy else "put"
    if method == "POST":
        if "uploads" in query:
            return "create_multipart"
        if "uploadId" in query:
            return "complete_multipart"
        if "delete" in query:
            return "delete_batch"
    if method == "DELETE":
        if "uploadId" in query:
            return "abort_multipart"
        if path.count("/") >= 2:
            return "delete"
    return "other"


@dataclasses.dataclass
class Fault:
    remaining: int
    status: int = 503
    code: str = "SlowDown"
    cut_after: int | None = None  # cut the body after this many bytes instead of failing
    match: Callable[[str], bool] | None = None  # only requests whose path+query match
    delay_s: float = 0.0  # hold the request this long, then forward it (no failure)
    forward: bool = False  # forward it (the server acts on it), then answer the error


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.requests: collections.Counter[str] = collections.Counter()
        self.body_bytes: collections.Counter[str] = collections.Counter()
        self.log: list[tuple[str, str, dict[str, str]]] = []  # (kind, path, headers)
        self.sizes: list[tuple[str, str, int]] = []  # (kind, path+query, request body bytes)
        self.inflight: collections.Counter[str] = collections.Counter()
        self.max_inflight: collections.Counter[str] = collections.Counter()
        self._faults: dict[str, list[Fault]] = {}  # per kind, used in order
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    # ---- test API --------------------------------------------------------------------------

    def fail_next(self, kind: str, count: int, status: int = 503, code: str = "SlowDown", *,
                  match: Callable[[str], bool] | None = None) -> None:
        with self._lock:
            self._faults[kind] = [Fault(count, status, code, match=match)]

    def forward_then_fail(self, kind: str, count: int, status: int = 500,
                          code: str = "InternalError") -> None:
        """Forward the next ``count`` requests of ``kind`` (the server does the work) but
        answer them with an error: an answer lost on the way back."""
        with self._lock:
            self._faults[kind] = [Fault(count, status, code, forward=True)]

    def delay_next(self, kind: str, count: int, seconds: float) -> None:
        """Hold the next ``count`` requests of ``kind`` for ``seconds``, then forward them."""
        with self._lock:
            self._faults[kind] = [Fault(count, delay_s=seconds)]

    def then(self, kind: str, fault: Fault) -> None:
        """Queue ``fault`` after the faults already set for ``kind`` (e.g. cut one answer,
        then fail the retry)."""
        with self._lock:
            self._faults.setdefault(kind, []).append(fault)

    def cut_next(self, kind: str, count: int, after_bytes: int) -> None:
        with self._lock:
            self._faults[kind] = [Fault(count, cut_after=after_bytes)]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.body_bytes.clear()
            self.log.clear()
            self.sizes.clear()
            self.max_inflight.clear()
            self._faults.clear()

    def _take_fault(self, kind: str, path_qs: str = "") -> Fault | None:
        with self._lock:
            queue = self._faults.get(kind, [])
            while queue and queue[0].remaining <= 0:
                queue.pop(0)
            if not queue:
                return None
            fault = queue[0]
            if fault.match is not None and not fault.match(path_qs):
                return None
            fault.remaining -= 1
            return fault

    # ---- server ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        kind = classify(request.method, dict(request.query), request.path, request.headers)
        with self._lock:
            self.requests[kind] += 1
            self.log.append((kind, request.path, dict(request.headers)))
            self.inflight[kind] += 1
            self.max_inflight[kind] = max(self.max_inflight[kind], self.inflight[kind])
        try:
            return await self._forward(request, kind)
        finally:
            with self._lock:
                self.inflight[kind] -= 1

    async def _forward(self, request: web.Request, kind: str) -> web.StreamResponse:
        fault = self._take_fault(kind, request.path_qs)
        if fault is not None and fault.delay_s:
            await asyncio.sleep(fault.delay_s)
            fault = None
        if fault is not None and fault.forward:
            body = await request.read()
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() not in ("transfer-encoding", "content-length")}
            assert self._session is not None
            async with self._session.request(request.method, self.upstream + request.path_qs,
                                             headers=headers, data=body or None,
                                             allow_redirects=False) as upstream:
                await upstream.read()
        if fault is not None and fault.cut_after is None:
            await request.read()  # take the whole upload first: the client sees the answer
            body = (f"<?xml version=\"1.0\"?><Error><Code>{fault.code}</Code>"
                    f"<Message>injected</Message></Error>").encode()
            return web.Response(status=fault.status, body=body, content_type="application/xml")
        body = await request.read()
        with self._lock:
            self.sizes.append((kind, request.path_qs, len(body)))
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("transfer-encoding", "content-length")}
        assert self._session is not None
        async with self._session.request(request.method, self.upstream + request.path_qs,
                                         headers=headers, data=body or None,
                                         allow_redirects=False) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for name, value in upstream.headers.items():
                if name.lower() not in ("transfer-encoding", "content-encoding", "connection",
                                        "content-length", "date", "server"):
                    response.headers[name] = value
            if upstream.content_length is not None and request.method != "HEAD":
                response.content_length = upstream.content_length
            elif request.method == "HEAD" and "Content-Length" in upstream.headers:
                response.headers["Content-Length"] = upstream.headers["Content-Length"]
            await response.prepare(request)
            sent = 0
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                if fault is not None and fault.cut_after is not None \
                        and sent + len(chunk) > fault.cut_after:
                    await response.write(chunk[:fault.cut_after - sent])
                    with self._lock:
                        self.body_bytes[kind] += fault.cut_after - sent
                    assert request.transport is not None
                    request.transport.close()  # the body breaks mid-stream
                    return response
                await response.write(chunk)
                sent += len(chunk)
                with self._lock:
                    self.body_bytes[kind] += len(chunk)
            await response.write_eof()
            return response

    def start(self) -> "FaultProxy":
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)

            async def setup() -> None:
                self._session = aiohttp.ClientSession(auto_decompress=False)
                app = web.Application(client_max_size=1 << 30)
                app.router.add_route("*", "/{tail:.*}", self._handle)
                self._runner = web.AppRunner(app, access_log=None)
                await self._runner.setup()
                await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

            loop.run_until_complete(setup())
            ready.set()
            loop.run_forever()

        self._session: aiohttp.ClientSession | None = None
        self._thread = threading.Thread(target=run, name="faultproxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def teardown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            if self._session is not None:
                await self._session.close()

        asyncio.run_coroutine_threadsafe(teardown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()
