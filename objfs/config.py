"""Typed, frozen daemon settings, validated once at the edge.

The CLI turns argv into a ``MountConfig`` through ``MountConfig.create``; every bad value is
rejected there with a one-line ``ConfigError`` naming the flag. The core never reads argv or the
environment (credentials are the AWS chain's business, resolved by botocore in ``store``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from pathlib import Path

from objfs.errors import ConfigError

MiB = 1024 * 1024
OBJECT_METADATA_MODES = ("off", "small", "all")
# --object-metadata small: objects up to this size (a symlink's target is at most 4095 bytes).
SMALL_OBJECT_BYTES = 4096

# S3 bucket names (AWS rules, slightly relaxed: S3-compatible stores allow '_' and capitals).
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket[/prefix]`` -> (bucket, prefix) where prefix is '' or ends with '/'."""
    if not url.startswith("s3://"):
        raise ConfigError(f"not an s3:// URL: {url!r} (expected s3://BUCKET[/PREFIX])")
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ConfigError(f"no bucket in {url!r} (expected s3://BUCKET[/PREFIX])")
    if not _BUCKET_RE.match(bucket):
        raise ConfigError(f"invalid bucket name {bucket!r} in {url!r}")
    prefix = prefix.strip("/")
    if prefix:
        if "//" in prefix or "\0" in prefix:
            raise ConfigError(f"invalid prefix {prefix!r} in {url!r}")
        if any(part in (".", "..") for part in prefix.split("/")):
            raise ConfigError(f"prefix {prefix!r} may not contain '.' or '..' segments")
        prefix += "/"
    return bucket, prefix


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(value: str | int, flag: str) -> int:
    """'10G', '512M', '1.5T', '4096' -> bytes. Units are binary (K = 1024), with or without
    a trailing 'B' or 'iB'."""
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value)
        if not match:
            raise ConfigError(f"{flag}: {value!r} is not a size like 512M, 10G or 1T")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size < 0:
        raise ConfigError(f"{flag}: must be >= 0, got {value!r}")
    return size


def parse_host_port(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 \
            or any(c.isspace() or c in "/?#@," for c in host):
        raise ConfigError(f"{flag}: {value!r} is not HOST:PORT (e.g. 127.0.0.1:9567)")
    return host, int(port)


def member_id(host: str, port: int) -> str:
    """The id a cluster member is known by (hashed by the owner function: every member must
    spell an address the same way): ``HOST:PORT``, ``[V6ADDR]:PORT``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_WILDCARDS = ("0.0.0.0", "::", "*")


def parse_rate(value: str, flag: str) -> int:
    """'200M', '1G/s', '50MiB/s' -> bytes per second (binary units, like sizes)."""
    text = value.strip()
    if text.lower().endswith("/s"):
        text = text[:-2]
    rate = parse_size(text, flag)
    if rate <= 0:
        raise ConfigError(f"{flag}: must be a positive rate like 200M (bytes/s), got {value!r}")
    return rate


def _parse_mode(value: str | int, flag: str) -> int:
    try:
        mode = int(value, 8) if isinstance(value, str) else int(value)
    except ValueError:
        raise ConfigError(f"{flag}: {value!r} is not an octal mode like 0644") from None
    if not 0 <= mode <= 0o7777:
        raise ConfigError(f"{flag}: {value!r} is out of range (0000-7777)")
    return mode


@dataclasses.dataclass(frozen=True)
class RetryConfig:
    """Backoff for origin requests: full jitter, capped, bounded by a total time budget."""

    base_delay_s: float = 0.05
    max_delay_s: float = 2.0
    max_attempts: int = 8
    budget_s: float = 30.0

    def __post_init__(self) -> None:
        if self.base_delay_s <= 0 or self.max_delay_s < self.base_delay_s:
            raise ConfigError("retry delays must be positive and base <= max")
        if self.max_attempts < 1:
            raise ConfigError("retry attempts must be >= 1")
        if self.budget_s <= 0:
            raise ConfigError("retry budget must be positive")


@dataclasses.dataclass(frozen=True)
class StoreConfig:
    """Where the origin is and how to talk to it."""

    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    region: str = "us-east-1"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_connections: int = 64
    retry: RetryConfig = RetryConfig()

    def __post_init__(self) -> None:
        if self.endpoint is not None and not re.match(r"^https?://[^/\s]+/?$", self.endpoint):
            raise ConfigError(
                f"--endpoint: {self.endpoint!r} is not an http(s)://HOST[:PORT] URL")
        if self.max_connections < 1:
            raise ConfigError("max connections must be >= 1")

    @property
    def identity(self) -> str:
        """What the metadata tree in a cache dir belongs to."""
        return f"{self.endpoint or 'aws'}|{self.region}|{self.bucket}|{self.prefix}"


def default_cache_root() -> Path:
    if os.geteuid() == 0:
        return Path("/var/cache/objfs")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "objfs"


def default_cache_dir(store: StoreConfig) -> Path:
    digest = hashlib.sha256(store.identity.encode()).hexdigest()[:12]
    return default_cache_root() / f"{store.bucket}-{digest}"


@dataclasses.dataclass(frozen=True)
class MountConfig:
    """Everything one mount needs; built by ``create`` from CLI values."""

    store: StoreConfig
    mountpoint: Path
    cache_dir: Path
    foreground: bool = False
    read_only: bool = False
    ttl_s: float = 300.0
    # How long the kernel may cache names and attributes. The tree changes only when this host
    # changes it (the kernel sees those) or a relist does (which tells the kernel what changed,
    # see Filesystem.entries_removed/attrs_changed), so by default it is the TTL.
    attr_timeout_s: float = 300.0
    allow_other: bool = False
    uid: int = dataclasses.field(default_factory=os.getuid)
    gid: int = dataclasses.field(default_factory=os.getgid)
    file_mode: int = 0o644
    dir_mode: int = 0o755
    fuse_options: tuple[str, ...] = ()
    fuse_workers: int = 16
    read_parallelism: int = 16        # ranged GETs in flight for the whole mount
    read_request_bytes: int = 8 * MiB  # split coalesced ranges into GETs of at most this
    readahead_bytes: int = 128 * MiB   # largest readahead window of a sequential reader
    # Objects up to this size read out of order are fetched whole in the background
    # (None: a quarter of the cache, at most 4 GiB; 0: never).
    random_prefetch_bytes: int | None = None
    cache_size_bytes: int = 10 * 1024 * MiB  # page files on disk, headers included
    cache_free_floor_bytes: int = 1024 * MiB  # keep this much free on the cache filesystem
    cache_policy: str = "lru"
    object_metadata: str = "off"       # off | small | all: HEAD objects for mode/owner/symlink
    metrics_addr: tuple[str, int] | None = None  # serve Prometheus /metrics here
    write_buffer_bytes: int = 512 * MiB  # global budget of write buffers (all open files)
    upload_concurrency: int = 8        # parts of one file in flight
    part_size_bytes: int = 8 * MiB     # multipart part: whole 4 MiB blocks (US3 takes 4M)
    rename_dir_limit: int = 10_000     # objects a directory rename may copy (else EXDEV)
    log_level: str = "INFO"
    log_file: Path | None = None
    # The peer cache (README "Peer cache"): all None/empty without --peer-listen.
    peer_listen: tuple[str, int] | None = None
    peer_id: str | None = None           # --peer-advertise, or the listen address
    peers: tuple[str, ...] = ()          # member ids from --peers (may include peer_id)
    cluster_secret_file: Path | None = None
    cluster_secret: bytes | None = dataclasses.field(default=None, repr=False, compare=False)
    peer_serve_limit_bytes: int | None = None   # bytes/s served to peers
    origin_read_limit_bytes: int | None = None  # bytes/s of ranged GETs
    master_url: str | None = None        # --master: register, heartbeat, run preload work

    @property
    def cluster(self) -> bool:
        return self.peer_listen is not None

    @classmethod
    def create(cls, *, url: str, mountpoint: str, endpoint: str | None = None,
               region: str | None = None, cache_dir: str | None = None,
               ttl: float | None = None, uid: int | None = None, gid: int | None = None,
               file_mode: str | None = None, dir_mode: str | None = None,
               fuse_options: list[str] | None = None, cache_size: str | None = None,
               cache_free_floor: str | None = None, readahead: str | None = None,
               read_request_size: str | None = None, metrics_addr: str | None = None,
               write_buffer: str | None = None, part_size: str | None = None,
               peer_listen: str | None = None, peers: str | list[str] | None = None,
               cluster_secret_file: str | None = None, peer_advertise: str | None = None,
               peer_serve_limit: str | None = None, origin_read_limit: str | None = None,
               random_prefetch: str | None = None, master: str | None = None,
               **rest: object) -> "MountConfig":
        """Validate CLI-level values and build the config. Raises ConfigError."""
        bucket, prefix = parse_s3_url(url)
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") \
            or "us-east-1"
        store = StoreConfig(bucket=bucket, prefix=prefix,
                            endpoint=endpoint.rstrip("/") if endpoint else None, region=region)
        mp = Path(mountpoint).expanduser()
        mp = Path(os.path.abspath(mp))
        cdir = Path(os.path.abspath(Path(cache_dir).expanduser())) if cache_dir \
            else default_cache_dir(store)
        options: list[str] = []
        for opt in fuse_options or []:
            options.extend(o.strip() for o in opt.split(",") if o.strip())
        kwargs: dict[str, object] = dict(rest)
        if ttl is not None:
            if not 0 < ttl < math.inf:  # also rejects nan, which compares false with anything
                raise ConfigError(f"--ttl: must be positive seconds, got {ttl}")
            kwargs["ttl_s"] = float(ttl)
        if kwargs.get("attr_timeout_s") is None:
            kwargs.pop("attr_timeout_s", None)
            kwargs["attr_timeout_s"] = float(kwargs.get("ttl_s", cls.ttl_s))
        for name, value in (("uid", uid), ("gid", gid)):
            if value is not None:
                if value < 0:
                    raise ConfigError(f"--{name}: must be >= 0, got {value}")
                kwargs[name] = value
        for flag, field, value in (("--cache-size", "cache_size_bytes", cache_size),
                                   ("--cache-free-floor", "cache_free_floor_bytes",
                                    cache_free_floor),
                                   ("--readahead", "readahead_bytes", readahead),
                                   ("--read-request-size", "read_request_bytes",
                                    read_request_size),
                                   ("--write-buffer", "write_buffer_bytes", write_buffer),
                                   ("--part-size", "part_size_bytes", part_size),
                                   ("--random-prefetch", "random_prefetch_bytes",
                                    random_prefetch)):
            if value is not None:
                kwargs[field] = parse_size(value, flag)
        if metrics_addr is not None:
            kwargs["metrics_addr"] = parse_host_port(metrics_addr, "--metrics-addr")
        kwargs.update(_cluster_settings(peer_listen, peers, cluster_secret_file, peer_advertise,
                                        peer_serve_limit, master))
        if origin_read_limit is not None:
            kwargs["origin_read_limit_bytes"] = parse_rate(origin_read_limit,
                                                           "--origin-read-limit")
        if file_mode is not None:
            kwargs["file_mode"] = _parse_mode(file_mode, "--file-mode")
        if dir_mode is not None:
            kwargs["dir_mode"] = _parse_mode(dir_mode, "--dir-mode")
        config = cls(store=store, mountpoint=mp, cache_dir=cdir,
                     fuse_options=tuple(options), **kwargs)  # type: ignore[arg-type]
        return config

    @property
    def whole_object_bytes(self) -> int:
        """The largest object a random reader gets fetched whole (``--random-prefetch``)."""
        if self.random_prefetch_bytes is not None:
            return self.random_prefetch_bytes
        return min(self.cache_size_bytes // 4, 4 * 1024 * MiB)

    def __post_init__(self) -> None:
        if self.fuse_workers < 1:
            raise ConfigError("--fuse-workers must be >= 1")
        if not 0 <= self.attr_timeout_s < math.inf:
            raise ConfigError(f"--attr-timeout must be >= 0 seconds, got {self.attr_timeout_s}")
        if self.read_parallelism < 1:
            raise ConfigError("--read-parallelism must be >= 1")
        if self.read_request_bytes < MiB or self.read_request_bytes % MiB:
            raise ConfigError("--read-request-size must be a positive multiple of 1 MiB")
        if self.readahead_bytes < MiB or self.readahead_bytes % MiB:
            raise ConfigError("--readahead must be a positive multiple of 1 MiB")
        if self.object_metadata not in OBJECT_METADATA_MODES:
            raise ConfigError(f"--object-metadata: unknown mode {self.object_metadata!r} "
                              f"(choose {', '.join(OBJECT_METADATA_MODES)})")
        if self.cache_policy not in ("lru", "uniform"):
            raise ConfigError(f"--cache-policy: unknown policy {self.cache_policy!r} "
                              "(choose lru or uniform)")
        if self.part_size_bytes < 4 * MiB or self.part_size_bytes % (4 * MiB):
            raise ConfigError("--part-size must be a multiple of 4M (whole logical blocks)")
        if self.write_buffer_bytes < self.part_size_bytes:
            raise ConfigError("--write-buffer must hold at least one part (--part-size)")
        if self.upload_concurrency < 1:
            raise ConfigError("--upload-concurrency must be >= 1")
        if self.rename_dir_limit < 0:
            raise ConfigError("--rename-dir-limit must be >= 0")
        if self.cache_size_bytes < 0 or self.cache_free_floor_bytes < 0:
            raise ConfigError("--cache-size and --cache-free-floor must be >= 0")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"--log-level: unknown level {self.log_level!r}")


def _cluster_settings(peer_listen: str | None, peers: str | list[str] | None,
                      secret_file: str | None, advertise: str | None,
                      serve_limit: str | None, master: str | None = None) -> dict[str, object]:
    """Validate the peer-cache and master flags together; reads and checks the secret file.

    ``--master`` needs ``--peer-listen``: a member is known by its peer address, and the
    extents the master gives it are the ones the other members will ask it for. With
    ``--master``, ``--peers`` is optional: the first member list, until the master answers.
    """
    from objfs.cluster import load_cluster_secret

    peer_list = [peers] if isinstance(peers, str) else list(peers or [])
    items = [p.strip() for chunk in peer_list for p in chunk.split(",")]
    if peer_list and not any(items):
        raise ConfigError("--peers: empty list (expected HOST:PORT,HOST:PORT,...)")
    if peer_listen is None:
        if master is not None:
            raise ConfigError("--master needs --peer-listen HOST:PORT (a member is known by "
                              "its peer-cache address, where the others fetch what it "
                              "preloads) and --cluster-secret-file FILE")
        for flag, value in (("--peers", peers), ("--cluster-secret-file", secret_file),
                            ("--peer-advertise", advertise),
                            ("--peer-serve-limit", serve_limit)):
            if value is not None:
                raise ConfigError(f"{flag} needs --peer-listen HOST:PORT (this host's "
                                  "peer-cache address)")
        return {}
    if secret_file is None:
        raise ConfigError(f"{'--master' if master else '--peer-listen'} needs "
                          "--cluster-secret-file FILE (the secret every member of the "
                          "cluster, and its master, share)")
    listen = parse_host_port(peer_listen, "--peer-listen")
    if advertise is not None:
        host, port = parse_host_port(advertise, "--peer-advertise")
        if host in _WILDCARDS:
            raise ConfigError(f"--peer-advertise: {advertise!r} is a wildcard address; give "
                              "the address the other members reach this host at")
        self_id = member_id(host, port)
    elif listen[0] in _WILDCARDS:
        raise ConfigError(f"--peer-listen {peer_listen} listens on every address: add "
                          "--peer-advertise HOST:PORT (the address the other members use)")
    else:
        self_id = member_id(*listen)
    members = []
    for item in items:
        if not item:
            raise ConfigError(f"--peers: empty entry in {','.join(peer_list)!r}")
        host, port = parse_host_port(item, "--peers")
        if host in _WILDCARDS:
            raise ConfigError(f"--peers: {item!r} is a wildcard address")
        members.append(member_id(host, port))
    secret_path = Path(os.path.abspath(Path(secret_file).expanduser()))
    settings: dict[str, object] = {
        "peer_listen": listen, "peer_id": self_id, "peers": tuple(dict.fromkeys(members)),
        "cluster_secret_file": secret_path,
        "cluster_secret": load_cluster_secret(secret_path),
    }
    if serve_limit is not None:
        settings["peer_serve_limit_bytes"] = parse_rate(serve_limit, "--peer-serve-limit")
    if master is not None:
        from objfs.master.client import parse_master_url

        scheme, host, port = parse_master_url(master.strip())
        settings["master_url"] = f"{scheme}://{host}:{port}" if ":" not in host \
            else f"{scheme}://[{host}]:{port}"
    return settings
