"""The master's HTTP face: a thin aiohttp adapter over ``Coordinator`` (routes in
``master.protocol``).

Everything under ``/v1`` goes through the cluster's signature check first
(``objfs.cluster.auth_middleware``: 401 and no data otherwise), then through one error mapper:
a ``MasterError`` becomes its status and ``{"error", "code"}``; anything unexpected is logged
and becomes a 500 with the same shape. Coordinator calls block (LMDB, origin listings), so
they run in the app's thread pool, never on the loop. ``/metrics`` (Prometheus text: members,
jobs by state, bytes preloaded) is not signed: it carries only counts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from objfs.cluster import auth_middleware
from objfs.master.coordinator import Coordinator
from objfs.master.errors import BadRequest, MasterError, NotFound
from objfs.master.protocol import MemberReport, PreloadRequest

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024
_WARN_EVERY_S = 60.0
_COUNTERS = (  # metric name in Metrics -> (Prometheus name, labels, help)
    ("preload_fetched_bytes", "objfs_master_preload_bytes_total", {"result": "fetched"},
     "bytes of preload extents by outcome"),
    ("preload_skipped_bytes", "objfs_master_preload_bytes_total", {"result": "skipped"}, ""),
    ("preload_failed_bytes", "objfs_master_preload_bytes_total", {"result": "failed"}, ""),
    ("preload_files_done_total", "objfs_master_preload_files_total", {"result": "fetched"},
     "files of preload jobs by outcome"),
    ("preload_files_skipped_total", "objfs_master_preload_files_total", {"result": "skipped"},
     ""),
    ("preload_files_failed_total", "objfs_master_preload_files_total", {"result": "failed"},
     ""),
    ("jobs_submitted_total", "objfs_master_jobs_submitted_total", {}, "preload jobs accepted"),
    ("heartbeats_total", "objfs_master_heartbeats_total", {}, "member heartbeats answered"),
    ("members_joined_total", "objfs_master_members_joined_total", {}, "members registered"),
    ("members_dropped_total", "objfs_master_members_dropped_total", {},
     "members dropped (timeout or leave)"),
    ("extents_leased_total", "objfs_master_extents_leased_total", {},
     "extents handed to members"),
    ("extents_reassigned_total", "objfs_master_extents_reassigned_total", {},
     "extents moved off a dropped member"),
    ("extents_lost_total", "objfs_master_extents_lost_total", {},
     "leased extents a member no longer held (queued again)"),
    ("results_ignored_total", "objfs_master_results_ignored_total", {},
     "stale results (extent reassigned, job ended, repeated report)"),
    ("auth_refused_total", "objfs_master_auth_refused_total", {},
     "requests refused for a missing, wrong or stale signature"),
)


def make_app(coordinator: Coordinator, secret: bytes, *,
             executor: concurrent.futures.Executor | None = None,
             clock: Callable[[], float] = time.time) -> web.Application:
    """The root app: ``/metrics`` open, ``/v1/...`` signed."""
    metrics = coordinator.metrics
    warned_at: dict[str, float] = {}  # remote -> last warning (monotonic); the loop thread only

    def refused(remote: str, reason: str) -> None:
        """Count every refusal; log at most one a minute per remote address."""
        metrics.inc("auth_refused_total")
        now = time.monotonic()
        if now - warned_at.get(remote, -_WARN_EVERY_S) >= _WARN_EVERY_S:
            if len(warned_at) > 1024:
                warned_at.clear()
            warned_at[remote] = now
            log.warning("refused a request from %s: %s (further refusals from it are "
                        "counted, logged again in a minute)", remote, reason)

    async def call(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    async def body_json(request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw) if raw else {}
        except ValueError as exc:
            raise BadRequest(f"the body is not JSON: {exc}") from None

    async def submit(request: web.Request) -> web.Response:
        preload = PreloadRequest.from_json(await body_json(request))
        return web.json_response(await call(coordinator.submit, preload), status=201)

    async def status(request: web.Request) -> web.Response:
        return web.json_response(await call(coordinator.status, request.match_info["id"]))

    async def list_jobs(request: web.Request) -> web.Response:
        return web.json_response({"jobs": await call(coordinator.list_jobs)})

    async def cancel(request: web.Request) -> web.Response:
        return web.json_response(await call(coordinator.cancel, request.match_info["id"]))

    async def members(request: web.Request) -> web.Response:
        return web.json_response(await call(coordinator.members_view))

    async def heartbeat(request: web.Request) -> web.Response:
        report = MemberReport.from_json(await body_json(request))
        reply = await call(coordinator.heartbeat, report)
        return web.json_response(reply.to_json())

    async def leave(request: web.Request) -> web.Response:
        data = await body_json(request)
        member = data.get("member") if isinstance(data, dict) else None
        if not isinstance(member, str):
            raise BadRequest("member must be a string (HOST:PORT)")
        return web.json_response({"left": await call(coordinator.leave, member)})

    @web.middleware
    async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except MasterError as exc:
            if exc.status >= 500:
                log.warning("%s %s: %s", request.method, request.path, exc)
            return web.json_response({"error": str(exc), "code": exc.code}, status=exc.status)
        except web.HTTPException as exc:
            if exc.status == 404:
                exc = NotFound(f"no such API path: {request.method} {request.path}")
                return web.json_response({"error": str(exc), "code": exc.code}, status=404)
            return web.json_response({"error": exc.reason, "code": "http"}, status=exc.status)
        except Exception as exc:  # noqa: BLE001 - one place turns surprises into a 500
            log.exception("%s %s failed", request.method, request.path)
            return web.json_response({"error": f"internal error: {type(exc).__name__}: {exc}",
                                      "code": "internal"}, status=500)

    api = web.Application(middlewares=[auth_middleware(secret, clock=clock,
                                                       on_refused=refused), errors],
                          client_max_size=MAX_BODY_BYTES)
    api.router.add_post("/preloads", submit)
    api.router.add_get("/preloads", list_jobs)
    api.router.add_get("/preloads/{id}", status)
    api.router.add_delete("/preloads/{id}", cancel)
    api.router.add_get("/members", members)
    api.router.add_post("/members/heartbeat", heartbeat)
    api.router.add_post("/members/leave", leave)

    async def prometheus(request: web.Request) -> web.Response:
        text = prometheus_text(coordinator)
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    root = web.Application(client_max_size=MAX_BODY_BYTES)
    root.router.add_get("/metrics", prometheus)
    root.add_subapp("/v1/", api)
    return root


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus_text(coordinator: Coordinator) -> str:
    gauges = coordinator.gauges()
    counters = coordinator.metrics.snapshot()
    lines = ["# HELP objfs_master_members live members per group",
             "# TYPE objfs_master_members gauge"]
    for group, count in sorted(gauges["members"].items()):
        lines.append(f'objfs_master_members{{group="{_escape(group)}"}} {count}')
    lines += ["# HELP objfs_master_jobs preload jobs the master knows, by state",
              "# TYPE objfs_master_jobs gauge"]
    for state, count in sorted(gauges["jobs"].items()):
        lines.append(f'objfs_master_jobs{{state="{state}"}} {count}')
    declared: set[str] = set()
    for name, prom, labels, help_text in _COUNTERS:
        if prom not in declared:
            declared.add(prom)
            if help_text:
                lines.append(f"# HELP {prom} {help_text}")
            lines.append(f"# TYPE {prom} counter")
        label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{prom}{{{label_text}}} {float(counters.get(name, 0))!r}")
    return "\n".join(lines) + "\n"
