"""A small Python client of the master's preload API, for training code and the CLI.

    from objfs.master.client import MasterClient

    client = MasterClient.from_secret_file("http://master:9560", "/etc/objfs/cluster.secret")
    job = client.submit("s3://datasets/imagenet/train/")
    final = client.wait(job["id"], callback=lambda s: print(s["bytes"]["done"]))
    assert final["state"] == "done"

Every call is signed with the cluster secret (``objfs.cluster.sign``) and blocks (plain
``http.client``: no event loop needed). Errors are ``MasterError``s carrying the master's
one-line message and status: ``Unauthorized`` on a 401 (wrong secret or clock skew),
``MasterUnreachable`` when nothing answers, ``NotFound``/``Conflict``/``BadRequest`` for what
the master refused. Statuses are the JSON dicts of ``master.protocol`` ("Status").
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

from objfs.cluster import load_cluster_secret, sign
from objfs.errors import ConfigError
from objfs.master.errors import (BadRequest, Conflict, MasterError, MasterUnreachable,
                                 NotFound, OriginFailed, Unauthorized)
from objfs.master.protocol import HeartbeatReply, MemberReport

FINAL_STATES = frozenset({"done", "failed", "cancelled"})
_BY_STATUS: dict[int, type[MasterError]] = {400: BadRequest, 401: Unauthorized,
                                            404: NotFound, 409: Conflict, 502: OriginFailed}


def parse_master_url(url: str) -> tuple[str, str, int]:
    """``http://HOST:PORT`` -> (scheme, host, port). Raises ``ConfigError``."""
    parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname or \
            parsed.path not in ("", "/") or parsed.query:
        raise ConfigError(f"--master: {url!r} is not a URL like http://HOST:PORT")
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        raise ConfigError(f"--master: {url!r} has an invalid port") from None
    return parsed.scheme, parsed.hostname, port


class MasterClient:
    def __init__(self, url: str, secret: bytes, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._scheme, self._host, self._port = parse_master_url(url)
        self._secret = secret
        self.timeout = timeout

    @classmethod
    def from_secret_file(cls, url: str, secret_file: str, **kwargs: Any) -> "MasterClient":
        return cls(url, load_cluster_secret(secret_file), **kwargs)

    # ---- the API -----------------------------------------------------------------------------

    def submit(self, source: str | None = None, *, files: Sequence[str] | None = None,
               bandwidth_limit: int | None = None, group: str | None = None) -> dict[str, Any]:
        """Start preloading ``source`` (``s3://bucket/path``: a directory, a file, or a
        bucket) or the explicit ``files``; returns the new job's status (``["id"]``)."""
        if (source is None) == (files is None):
            raise BadRequest("give either a source or files")
        body: dict[str, Any] = {"source": source} if source is not None \
            else {"files": list(files or [])}
        if bandwidth_limit is not None:
            body["bandwidth_limit"] = bandwidth_limit
        if group is not None:
            body["group"] = group
        # An explicit list is checked file by file before the master answers.
        return self._call("POST", "/v1/preloads", body, timeout=max(self.timeout, 600.0))

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/preloads/{_quote(job_id)}")

    def list(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/preloads")["jobs"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/v1/preloads/{_quote(job_id)}")

    def members(self) -> dict[str, Any]:
        return self._call("GET", "/v1/members")

    def heartbeat(self, report: MemberReport) -> HeartbeatReply:
        """One member heartbeat (what a daemon sends; blocking, for tools and tests)."""
        return HeartbeatReply.from_json(self._call("POST", "/v1/members/heartbeat",
                                                   report.to_json()))

    def leave(self, member: str, timeout: float | None = None) -> bool:
        return bool(self._call("POST", "/v1/members/leave", {"member": member},
                               timeout=timeout)["left"])

    def wait(self, job_id: str, *, callback: Callable[[dict[str, Any]], None] | None = None,
             interval: float = 1.0, timeout: float | None = None,
             sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
        """Poll until the job is final; ``callback(status)`` after every poll. Returns the
        final status; raises ``TimeoutError`` after ``timeout`` seconds. A poll that cannot
        reach the master is retried until the timeout (the job runs on without it)."""
        deadline = None if timeout is None else clock() + timeout
        while True:
            try:
                status = self.status(job_id)
            except MasterUnreachable:
                if deadline is not None and clock() >= deadline:
                    raise
                sleep(interval)
                continue
            if callback is not None:
                callback(status)
            if status["state"] in FINAL_STATES:
                return status
            if deadline is not None and clock() >= deadline:
                raise TimeoutError(f"preload {job_id} is still {status['state']} after "
                                   f"{timeout:g}s")
            sleep(interval)

    # ---- transport -------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Any = None,
              timeout: float | None = None) -> Any:
        data = b"" if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **sign(self._secret, method, path, data)}
        conn_cls = http.client.HTTPSConnection if self._scheme == "https" \
            else http.client.HTTPConnection
        conn = conn_cls(self._host, self._port, timeout=timeout or self.timeout)
        try:
            conn.request(method, path, body=data or None, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise MasterUnreachable(f"cannot reach the master at {self.url}: {reason}") \
                from None
        finally:
            conn.close()
        try:
            payload = json.loads(raw) if raw else {}
        except ValueError:
            raise MasterError(f"the master at {self.url} answered {response.status} with "
                              f"something that is not JSON: {raw[:120]!r}") from None
        if response.status == 401:
            raise Unauthorized(f"the master at {self.url} refused our signature: use the "
                               "cluster's secret (--cluster-secret-file) and keep clocks "
                               "within 5 minutes")
        if response.status >= 400:
            message = payload.get("error") if isinstance(payload, dict) else None
            code = payload.get("code") if isinstance(payload, dict) else None
            cls = _BY_STATUS.get(response.status, MasterError)
            raise cls(message or f"HTTP {response.status}", status=response.status,
                      code=code)
        return payload


def _quote(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")
