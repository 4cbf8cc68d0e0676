"""The local control endpoint of one mount, and its Prometheus exposition.

An aiohttp app on the daemon's event loop, served on a unix socket in the cache dir (mode 0600,
so only the mount's owner can drive it), and optionally on ``--metrics-addr HOST:PORT`` for
Prometheus (``/metrics`` only there: commands never listen on TCP).

    GET  /stats                 {"mount": {...}, "time": t, "metrics": {name: value}}
    GET  /metrics               Prometheus text format, every metric labelled with the mount
                                (peer-cache counters also per peer address: label ``peer``)
    GET  /peers                 the cluster as this daemon sees it (``cache.peer``), or
                                {"cluster": false}
    POST /refresh?path=REL      relist PREFIX/REL now (the whole mount without path)
    POST /cache/drop?path=REL   remove the cached pages of a file, or of every file under a dir
    POST /preload?path=REL[&bandwidth_limit=BYTES_PER_S]
                                warm this host's cache with a file or dir (``objfs.warmup``):
                                answers the new job's status (the master's status format)
    GET  /preload               {"jobs": [status, ...]} (newest first)
    GET  /preload/ID            a job's status;  DELETE /preload/ID  cancels it

Commands run in a worker thread (they list the origin or delete files), never on the loop.
``objfs stats|refresh|cache drop MOUNTPOINT`` find the socket through the root's
``user.objfs.control`` extended attribute, so the mount point alone is enough.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from objfs.errors import ObjfsError
from objfs.metrics import Metrics

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
_PROM_NAME = re.compile(r"[^a-zA-Z0-9_]")


def prometheus_text(metrics: dict[str, float], labels: dict[str, str],
                    gauges: frozenset[str] = frozenset(),
                    labeled: Mapping[str, Mapping[tuple[tuple[str, str], ...], float]]
                    | None = None) -> str:
    """Metrics named as counters (``_total``, ``_bytes``, ``_s``) are counters unless listed
    in ``gauges`` (sampled gauges and up/down counts); everything else is a gauge.

    ``labeled`` (``Metrics.labeled``) adds series with labels of their own (e.g. ``peer``)
    on top of ``labels``; a name that has labelled series is shown only as those (its
    plain total is their sum), so ``sum()`` over a metric never counts a byte twice."""
    labeled = labeled or {}
    lines = []
    for name in sorted(set(metrics) | set(labeled)):
        if name in labeled:
            series = [({**labels, **dict(extra)}, value)
                      for extra, value in sorted(labeled[name].items())]
        else:
            series = [(labels, metrics[name])]
        series = [(lbl, v) for lbl, v in series
                  if isinstance(v, (int, float)) and not math.isnan(v)]
        if not series:
            continue
        prom = "objfs_" + _PROM_NAME.sub("_", name)
        kind = "counter" if name.endswith(("_total", "_bytes", "_s")) and \
            name not in gauges else "gauge"
        if kind == "counter" and not prom.endswith("_total"):
            prom += "_total"  # OpenMetrics wants counters to end in _total
        lines.append(f"# TYPE {prom} {kind}")
        for lbl, value in series:
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(lbl.items()))
            lines.append(f"{prom}{{{label_text}}} {float(value)!r}")
    return "\n".join(lines) + "\n"


def _limit(query: Mapping[str, str]) -> int | None:
    text = query.get("bandwidth_limit")
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ObjfsError(f"bandwidth_limit must be bytes per second, not {text!r}") from None
    if value <= 0:
        raise ObjfsError("bandwidth_limit must be positive")
    return value


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class ControlServer:
    """Owns the aiohttp runner; start/stop are called from any thread, run on the loop."""

    def __init__(self, *, loop: Any, metrics: Metrics, info: dict[str, Any],
                 socket_path: Path, refresh: Callable[[str], dict[str, Any]],
                 drop: Callable[[str], dict[str, Any]],
                 metrics_addr: tuple[str, int] | None = None,
                 peers: Callable[[], dict[str, Any]] | None = None,
                 preloads: Any = None) -> None:
        self._loop = loop  # objfs.loop.EventLoopThread
        self._metrics = metrics
        self._info = info
        self.socket_path = socket_path
        self._refresh = refresh
        self._drop = drop
        self._metrics_addr = metrics_addr
        self._peers = peers
        self._preloads = preloads  # objfs.warmup.LocalPreloads
        self._runner: web.AppRunner | None = None
        self._prom_runner: web.AppRunner | None = None

    def start(self) -> None:
        self._loop.run(self._start(), timeout=30)

    def stop(self) -> None:
        try:
            self._loop.run(self._stop(), timeout=10)
        except Exception as exc:  # shutting down anyway
            log.debug("control endpoint stop: %s", exc)
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/stats", self._stats)
        app.router.add_get("/metrics", self._prometheus)
        app.router.add_get("/peers", self._peer_list)
        app.router.add_post("/refresh", self._command(self._refresh))
        app.router.add_post("/cache/drop", self._command(self._drop))
        if self._preloads is not None:
            preloads = self._preloads
            app.router.add_post("/preload", self._call(
                lambda r: preloads.start(r.query.get("path", ""), _limit(r.query))))
            app.router.add_get("/preload", self._call(lambda r: {"jobs": preloads.list()}))
            app.router.add_get("/preload/{id}", self._call(
                lambda r: preloads.status(r.match_info["id"])))
            app.router.add_delete("/preload/{id}", self._call(
                lambda r: preloads.cancel(r.match_info["id"])))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
        # Bind through a descriptor of the cache dir: unix socket paths are limited to 107
        # bytes, cache dir paths are not. Created with the process umask (others cannot
        # connect without write permission), then restricted to the owner.
        dir_fd = os.open(self.socket_path.parent, os.O_PATH | os.O_DIRECTORY)
        try:
            short = f"/proc/self/fd/{dir_fd}/{self.socket_path.name}"
            await web.UnixSite(self._runner, short).start()
            os.chmod(short, 0o600)
        finally:
            os.close(dir_fd)
        if self._metrics_addr is not None:
            prom = web.Application()
            prom.router.add_get("/metrics", self._prometheus)
            self._prom_runner = web.AppRunner(prom, access_log=None)
            await self._prom_runner.setup()
            host, port = self._metrics_addr
            try:
                await web.TCPSite(self._prom_runner, host, port).start()
            except OSError as exc:
                raise ObjfsError(f"--metrics-addr {host}:{port}: {exc.strerror or exc}") \
                    from None

    async def _stop(self) -> None:
        for runner in (self._runner, self._prom_runner):
            if runner is not None:
                await runner.cleanup()

    def snapshot(self) -> dict[str, Any]:
        return {"mount": self._info, "time": time.time(), "metrics": self._metrics.snapshot()}

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def _prometheus(self, request: web.Request) -> web.Response:
        text = prometheus_text(self._metrics.snapshot(),
                               {"mount": str(self._info.get("mountpoint", ""))},
                               self._metrics.gauge_names(), self._metrics.labeled())
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    async def _peer_list(self, request: web.Request) -> web.Response:
        if self._peers is None:
            return web.json_response({"cluster": False})
        return web.json_response({"cluster": True, **self._peers()})

    def _command(self, fn: Callable[[str], dict[str, Any]]) -> Any:
        return self._call(lambda request: fn(request.query.get("path", "")))

    def _call(self, fn: Callable[[web.Request], dict[str, Any]]) -> Any:
        """A handler running ``fn(request)`` in a worker thread: its result as JSON, an
        ``ObjfsError`` as ``{"error", "errno"}`` with 404 (ENOENT) or 400."""
        async def handler(request: web.Request) -> web.Response:
            try:
                result = await asyncio.get_running_loop().run_in_executor(None, fn, request)
            except ObjfsError as exc:
                if exc.errno == errno.ENOENT:
                    return web.json_response({"error": str(exc), "errno": exc.errno},
                                             status=404)
                return web.json_response({"error": str(exc), "errno": exc.errno}, status=400)
            except Exception as exc:
                log.exception("control command %s failed", request.path)
                return web.json_response({"error": f"{type(exc).__name__}: {exc}"},
                                         status=500)
            return web.json_response(result)
        return handler
