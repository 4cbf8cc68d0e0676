"""What travels between the master, its members (the daemons) and API clients: JSON over HTTP.

Every request, from a member or a client, is signed with the cluster secret
(``objfs.cluster.sign``: headers ``X-Objfs-Date`` and ``X-Objfs-Signature``, an HMAC over
method, raw path, timestamp and body hash); anything else gets 401 and no data. Errors are
``{"error": "<one line>", "code": "<code>"}`` with a 4xx/5xx status. Only ``GET /metrics``
(Prometheus; aggregate counts, no names) is open.

Members: pull-based
-------------------
The master never connects to a daemon. A daemon started with ``--master URL`` calls
``POST /v1/members/heartbeat`` every ``heartbeat_interval_s`` (and at once when its queue of
preload work runs low). A master that is down stops nothing: the daemon keeps its last member
list and serves reads; its preload work simply pauses. A member sends one heartbeat at a time.

Request (``MemberReport``)::

    {"protocol": 1,
     "member": "10.0.0.5:9567",           # its peer address: the member id
     "incarnation": "6f1c...",            # random per daemon start
     "origin": {"endpoint": "http://s3.internal:8333", "bucket": "datasets",
                "prefix": "imagenet/"},    # what it mounts ("" endpoint = AWS)
     "extent_pages": 8,                   # its owner function's extent, in 1 MiB pages
     "cache": {"capacity_bytes": N, "used_bytes": N, "free_bytes": N},
     "held": [{"job": "J", "task": 17}],  # every task received and not yet reported final
     "results": [{"job": "J", "task": 12, "state": "done",      # or "failed"
                  "fetched_bytes": N, "skipped_bytes": N, "error": null}],
     "jobs": ["J"],                       # other jobs it keeps state for (pinned pages)
     "want_tasks": 256, "want_bytes": 1073741824}   # how much more work it takes now

Answer (``HeartbeatReply``)::

    {"protocol": 1,
     "members": ["10.0.0.5:9567", "10.0.0.6:9567"],  # live members of its group, itself too
     "extent_pages": 8, "heartbeat_interval_s": 2.0, "member_timeout_s": 15.0,
     "work": [{"job": "J", "task": 18, "key": "imagenet/train/0001.tar",
               "etag": "\\"9b2c...\\"", "size": N, "extent": 3, "extent_pages": 8}],
     "jobs": {"J": {"state": "running", "limit_bytes_per_s": 52428800}},
     "revoked": [{"job": "J", "task": 17}]}           # held tasks no longer this member's

- *Group*: the members with the same origin endpoint, bucket and prefix. Their member list is
  what every one of them builds its owner function (``objfs.cache.ring.Ring``) from; a member
  whose ``extent_pages`` differs from the live members of its group is refused with 409 (the
  owner functions would disagree).
- *Work*: one item per extent: fetch pages ``[extent*extent_pages, ...)`` of that object
  version (pinned to the ETag) into the local cache at preload priority, skipping Ready pages,
  then report ``done`` with the bytes fetched and skipped (they add up to the extent's bytes),
  or ``failed`` with a one-line error. Results are resent until a heartbeat is answered
  (handling them is idempotent). A task leased to a member and absent from both its ``held``
  and ``results`` is taken back and leased again. ``limit_bytes_per_s`` is this member's share
  of the job's bandwidth limit (the job limit divided by the live members of the group).
- *Jobs*: the state of every job the member mentioned (held, results, ``jobs``) or received
  work of. ``cancelled``: stop its extents within seconds and report nothing more of it;
  any final state (or ``unknown``): release what the job pinned.
- A member that misses heartbeats for ``member_timeout_s`` is dropped: the members of its
  group get the new list in their next answers, and its unfinished extents go to their new
  owners. ``POST /v1/members/leave`` ``{"member": ID}`` drops it at once (clean unmount).

Preload API
-----------
``POST /v1/preloads`` ``{"source": "s3://bucket/path"}`` (a directory, a file, or the whole
bucket) or ``{"files": ["s3://bucket/key", ...]}`` (one bucket), optionally
``"bandwidth_limit": 104857600`` (bytes/s for the whole job) and ``"group": "<group id>"``
(needed only when several groups mount the data) -> 201 and the job status (below).
``GET /v1/preloads/ID`` -> the status; ``GET /v1/preloads`` -> ``{"jobs": [status, ...]}``
(newest first); ``DELETE /v1/preloads/ID`` -> cancels, answers the status;
``GET /v1/members`` -> ``{"members": [...], "groups": [...]}``.

Status: ``id, source, group, state, listing, created_at, started_at, ended_at,
bandwidth_limit, files {total, done, skipped, failed}, bytes {total, done, skipped, failed},
extents {total, final, failed, reassigned, retried}, throughput_bytes_per_s (fetched from the
origin, last seconds), elapsed_s, eta_s, hosts {member: {state, extents_assigned,
extents_done, extents_failed, bytes_done, bytes_skipped, bytes_failed}}, errors [first ten:
{time, host, key, extent, error}], error_count, message, warnings``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from objfs.config import parse_host_port
from objfs.errors import ConfigError
from objfs.master.errors import BadRequest

PROTOCOL_VERSION = 1
MAX_TASKS_PER_REPLY = 2000
_ENDPOINT_RE = re.compile(r"^https?://[^/\s]+$")


def normalize_endpoint(endpoint: str | None) -> str:
    """The form endpoints are compared in: scheme and host lower-case, no trailing slash;
    "" for AWS itself."""
    if not endpoint:
        return ""
    endpoint = endpoint.strip().rstrip("/")
    scheme, sep, rest = endpoint.partition("://")
    if not sep or not _ENDPOINT_RE.match(endpoint):
        raise BadRequest(f"origin endpoint {endpoint!r} is not an http(s)://HOST[:PORT] URL")
    return f"{scheme.lower()}://{rest.lower()}"


@dataclasses.dataclass(frozen=True, order=True)
class Origin:
    """What a member mounts; members with the same ``Origin`` form one group."""

    endpoint: str  # normalized; "" = AWS
    bucket: str
    prefix: str    # "" or ending in "/"

    @property
    def group_id(self) -> str:
        """A URL of the mounted data: ``ENDPOINT/BUCKET/PREFIX`` (``s3://BUCKET/PREFIX``
        for AWS)."""
        if self.endpoint:
            return f"{self.endpoint}/{self.bucket}/{self.prefix}"
        return f"s3://{self.bucket}/{self.prefix}"

    def covers(self, bucket: str, key_or_prefix: str) -> bool:
        return bucket == self.bucket and key_or_prefix.startswith(self.prefix)

    def to_json(self) -> dict[str, str]:
        return {"endpoint": self.endpoint, "bucket": self.bucket, "prefix": self.prefix}

    @classmethod
    def from_json(cls, data: Any) -> "Origin":
        data = _mapping(data, "origin")
        bucket = _str(data, "bucket", "origin.bucket")
        prefix = _str(data, "prefix", "origin.prefix", default="")
        if not bucket or "/" in bucket:
            raise BadRequest(f"origin.bucket {bucket!r} is not a bucket name")
        if prefix and not prefix.endswith("/"):
            raise BadRequest(f"origin.prefix {prefix!r} must be empty or end with '/'")
        endpoint = _str(data, "endpoint", "origin.endpoint", default="")
        return cls(normalize_endpoint(endpoint), bucket, prefix)


@dataclasses.dataclass(frozen=True, order=True)
class TaskRef:
    job: str
    task: int

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "task": self.task}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "TaskRef":
        data = _mapping(data, where)
        return cls(_str(data, "job", f"{where}.job"), _int(data, "task", f"{where}.task"))


@dataclasses.dataclass(frozen=True)
class TaskResult:
    job: str
    task: int
    state: str           # "done" or "failed"
    fetched_bytes: int = 0
    skipped_bytes: int = 0
    error: str | None = None

    @property
    def ref(self) -> TaskRef:
        return TaskRef(self.job, self.task)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> "TaskResult":
        data = _mapping(data, where)
        state = _str(data, "state", f"{where}.state")
        if state not in ("done", "failed"):
            raise BadRequest(f"{where}.state must be 'done' or 'failed', not {state!r}")
        error = data.get("error")
        if error is not None and not isinstance(error, str):
            raise BadRequest(f"{where}.error must be a string")
        return cls(_str(data, "job", f"{where}.job"), _int(data, "task", f"{where}.task"),
                   state, _int(data, "fetched_bytes", f"{where}.fetched_bytes", default=0),
                   _int(data, "skipped_bytes", f"{where}.skipped_bytes", default=0),
                   error[:500] if error else None)


@dataclasses.dataclass(frozen=True)
class MemberReport:
    member: str
    incarnation: str
    origin: Origin
    extent_pages: int
    capacity_bytes: int = 0
    used_bytes: int = 0
    free_bytes: int = 0
    held: tuple[TaskRef, ...] = ()
    results: tuple[TaskResult, ...] = ()
    jobs: tuple[str, ...] = ()
    want_tasks: int = 0
    want_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"protocol": PROTOCOL_VERSION, "member": self.member,
                "incarnation": self.incarnation, "origin": self.origin.to_json(),
                "extent_pages": self.extent_pages,
                "cache": {"capacity_bytes": self.capacity_bytes, "used_bytes": self.used_bytes,
                          "free_bytes": self.free_bytes},
                "held": [r.to_json() for r in self.held],
                "results": [r.to_json() for r in self.results], "jobs": list(self.jobs),
                "want_tasks": self.want_tasks, "want_bytes": self.want_bytes}

    @classmethod
    def from_json(cls, data: Any) -> "MemberReport":
        data = _mapping(data, "heartbeat")
        version = data.get("protocol", PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION:
            raise BadRequest(f"member protocol {version!r} is not {PROTOCOL_VERSION}: "
                             "run the same objfs version on the master and the daemons")
        member = _str(data, "member", "member")
        try:
            parse_host_port(member, "member")
        except ConfigError as exc:
            raise BadRequest(str(exc)) from None
        extent_pages = _int(data, "extent_pages", "extent_pages")
        if extent_pages < 1:
            raise BadRequest("extent_pages must be >= 1")
        cache = _mapping(data.get("cache", {}), "cache")
        held = tuple(TaskRef.from_json(r, "held[]") for r in _list(data, "held"))
        results = tuple(TaskResult.from_json(r, "results[]") for r in _list(data, "results"))
        jobs = tuple(_check_str(j, "jobs[]") for j in _list(data, "jobs"))
        return cls(member=member, incarnation=_str(data, "incarnation", "incarnation",
                                                   default=""),
                   origin=Origin.from_json(data.get("origin")), extent_pages=extent_pages,
                   capacity_bytes=_int(cache, "capacity_bytes", "cache.capacity_bytes", 0),
                   used_bytes=_int(cache, "used_bytes", "cache.used_bytes", 0),
                   free_bytes=_int(cache, "free_bytes", "cache.free_bytes", 0),
                   held=held, results=results, jobs=jobs,
                   want_tasks=_int(data, "want_tasks", "want_tasks", 0),
                   want_bytes=_int(data, "want_bytes", "want_bytes", 0))


@dataclasses.dataclass(frozen=True)
class WorkItem:
    job: str
    task: int
    key: str
    etag: str
    size: int
    extent: int
    extent_pages: int

    @property
    def ref(self) -> TaskRef:
        return TaskRef(self.job, self.task)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "WorkItem":
        data = _mapping(data, "work[]")
        return cls(_str(data, "job", "work.job"), _int(data, "task", "work.task"),
                   _str(data, "key", "work.key"), _str(data, "etag", "work.etag"),
                   _int(data, "size", "work.size"), _int(data, "extent", "work.extent"),
                   _int(data, "extent_pages", "work.extent_pages"))


@dataclasses.dataclass(frozen=True)
class JobInfo:
    state: str
    limit_bytes_per_s: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "limit_bytes_per_s": self.limit_bytes_per_s}


@dataclasses.dataclass(frozen=True)
class HeartbeatReply:
    members: tuple[str, ...]
    extent_pages: int
    heartbeat_interval_s: float
    member_timeout_s: float
    work: tuple[WorkItem, ...] = ()
    jobs: Mapping[str, JobInfo] = dataclasses.field(default_factory=dict)
    revoked: tuple[TaskRef, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"protocol": PROTOCOL_VERSION, "members": list(self.members),
                "extent_pages": self.extent_pages,
                "heartbeat_interval_s": self.heartbeat_interval_s,
                "member_timeout_s": self.member_timeout_s,
                "work": [w.to_json() for w in self.work],
                "jobs": {j: info.to_json() for j, info in self.jobs.items()},
                "revoked": [r.to_json() for r in self.revoked]}

    @classmethod
    def from_json(cls, data: Any) -> "HeartbeatReply":
        data = _mapping(data, "reply")
        jobs = _mapping(data.get("jobs", {}), "jobs")
        parsed_jobs = {}
        for job_id, info in jobs.items():
            info = _mapping(info, f"jobs.{job_id}")
            limit = info.get("limit_bytes_per_s")
            parsed_jobs[job_id] = JobInfo(_str(info, "state", "jobs.state"),
                                          int(limit) if limit is not None else None)
        return cls(members=tuple(_check_str(m, "members[]") for m in _list(data, "members")),
                   extent_pages=_int(data, "extent_pages", "extent_pages"),
                   heartbeat_interval_s=float(data.get("heartbeat_interval_s", 2.0)),
                   member_timeout_s=float(data.get("member_timeout_s", 15.0)),
                   work=tuple(WorkItem.from_json(w) for w in _list(data, "work")),
                   jobs=parsed_jobs,
                   revoked=tuple(TaskRef.from_json(r, "revoked[]")
                                 for r in _list(data, "revoked")))


# ---- preload requests ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PreloadRequest:
    """A parsed ``POST /v1/preloads`` body. ``source`` is (bucket, path) where path is the key
    or key prefix as given ("" = the whole bucket; a trailing "/" = a directory only);
    ``files`` is (bucket, [keys])."""

    bucket: str
    path: str | None = None
    keys: tuple[str, ...] = ()
    bandwidth_limit: int | None = None
    group: str | None = None

    @property
    def source(self) -> str:
        if self.path is not None:
            return f"s3://{self.bucket}/{self.path}"
        first = f"s3://{self.bucket}/{self.keys[0]}" if self.keys else f"s3://{self.bucket}"
        return first if len(self.keys) == 1 else f"{first} and {len(self.keys) - 1} more files"

    @classmethod
    def from_json(cls, data: Any, max_files: int = 100_000) -> "PreloadRequest":
        data = _mapping(data, "request")
        unknown = set(data) - {"source", "files", "bandwidth_limit", "group"}
        if unknown:
            raise BadRequest(f"unknown field(s) {', '.join(sorted(unknown))} (expected source "
                             "or files, and optionally bandwidth_limit and group)")
        limit = data.get("bandwidth_limit")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit <= 0):
            raise BadRequest("bandwidth_limit must be a positive integer (bytes per second)")
        group = data.get("group")
        if group is not None and not isinstance(group, str):
            raise BadRequest("group must be a string (a group id from GET /v1/members)")
        if ("source" in data) == ("files" in data):
            raise BadRequest("give either source (s3://BUCKET/PATH) or files (a list of "
                             "s3://BUCKET/KEY)")
        if "source" in data:
            source = data["source"]
            if not isinstance(source, str):
                raise BadRequest("source must be a string like s3://BUCKET/PATH")
            bucket, path = parse_source(source)
            return cls(bucket, path=path, bandwidth_limit=limit, group=group)
        files = data["files"]
        if not isinstance(files, list) or not files:
            raise BadRequest("files must be a non-empty list of s3://BUCKET/KEY")
        if len(files) > max_files:
            raise BadRequest(f"files lists at most {max_files} files; preload a directory "
                             "instead")
        bucket = None
        keys: list[str] = []
        for url in files:
            if not isinstance(url, str):
                raise BadRequest("files must be a list of strings (s3://BUCKET/KEY)")
            b, key = parse_source(url)
            if not key or key.endswith("/"):
                raise BadRequest(f"{url!r} is not a file (s3://BUCKET/KEY)")
            if bucket is not None and b != bucket:
                raise BadRequest(f"files must all be in one bucket ({bucket!r} and {b!r})")
            bucket = b
            keys.append(key)
        assert bucket is not None
        return cls(bucket, keys=tuple(dict.fromkeys(keys)), bandwidth_limit=limit, group=group)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        if self.path is not None:
            body["source"] = f"s3://{self.bucket}/{self.path}"
        else:
            body["files"] = [f"s3://{self.bucket}/{k}" for k in self.keys]
        if self.bandwidth_limit is not None:
            body["bandwidth_limit"] = self.bandwidth_limit
        if self.group is not None:
            body["group"] = self.group
        return body


_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")


def parse_source(url: str) -> tuple[str, str]:
    """``s3://bucket[/path]`` -> (bucket, path) with path kept as given apart from a leading
    "/" (a trailing "/" means a directory). Raises ``BadRequest``."""
    if not url.startswith("s3://"):
        raise BadRequest(f"not an s3:// URL: {url!r} (expected s3://BUCKET/PATH)")
    bucket, _, path = url[len("s3://"):].partition("/")
    if not bucket or not _BUCKET_RE.match(bucket):
        raise BadRequest(f"invalid or missing bucket name in {url!r}")
    if "\0" in path or "//" in path or path.startswith("/"):
        raise BadRequest(f"invalid path in {url!r}")
    if path and any(part in (".", "..") for part in path.rstrip("/").split("/")):
        raise BadRequest(f"{url!r} may not contain '.' or '..' segments")
    if len(path.encode()) > 1024:
        raise BadRequest(f"{url[:80]!r}...: an S3 key has at most 1024 bytes")
    return bucket, path


# ---- validation helpers ----------------------------------------------------------------------

def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise BadRequest(f"{where} must be a JSON object")
    return value


def _list(data: Mapping[str, Any], name: str) -> Sequence[Any]:
    value = data.get(name, [])
    if not isinstance(value, list):
        raise BadRequest(f"{name} must be a list")
    return value


_MISSING = object()


def _str(data: Mapping[str, Any], name: str, where: str, default: Any = _MISSING) -> str:
    value = data.get(name, default)
    if value is _MISSING:
        raise BadRequest(f"{where} is missing")
    return _check_str(value, where)


def _check_str(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a string")
    return value


def _int(data: Mapping[str, Any], name: str, where: str, default: Any = _MISSING) -> int:
    value = data.get(name, default)
    if value is _MISSING:
        raise BadRequest(f"{where} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{where} must be a non-negative integer")
    return value
